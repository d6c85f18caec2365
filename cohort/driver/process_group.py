"""The torch process group of a fit's workers, as Ray Train's ``TorchConfig`` sets it up, without
importing torch in Ray Train's controller.

The controller is a Python process of its own, started for every fit. It unpickles the trainer's
backend configuration as it starts, and Ray's ``TorchConfig`` lives in a module that imports torch:
about 2.5 s (and as many CPU-seconds) on the path to the first step of every run, every trial and
every restart of a 2-core VM, spent in a process that never touches a tensor. ``ProcessGroupConfig``
is what cohort hands Ray Train instead: the same steps, taken by the workers, with torch imported
only there (this module imports no torch).

What the workers get, as with ``TorchConfig(backend=...)``, ``init_method="env"``: ``MASTER_ADDR`` and
``MASTER_PORT`` (rank 0's address and a free port), ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``LOCAL_WORLD_SIZE``, ``NODE_RANK``; ``torch.distributed.init_process_group`` with the run's backend
(``cohort.worker.grid.exchange_backend``: gloo, or NCCL with its asynchronous error handling on unless
the environment says otherwise); each worker's GPU as torch's current device while the training
function runs; the group destroyed and CUDA's cache emptied when the fit ends; ``CUDA_VISIBLE_DEVICES``
shared by the workers of a node, as Ray does for torch.
"""
from __future__ import annotations

import dataclasses
import os
from datetime import timedelta

import ray
from ray.exceptions import GetTimeoutError
from ray.train.backend import Backend, BackendConfig

# Ray Train's default timeout of the process group's operations (TorchConfig.timeout_s).
TIMEOUT_S = 1800
# NCCL's variables that say how a timed-out collective ends; without either, errors are raised.
NCCL_ERROR_VARIABLES = ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_NCCL_BLOCKING_WAIT")
# How long the workers may take to leave the group at the end (as Ray's torch backend, by default).
SHUTDOWN_TIMEOUT_S = 30


# --------------------------------------------------------------------------- on the workers


def set_rendezvous(address: str, port: int) -> None:
    """Where every rank finds rank 0 (``init_method="env://"``)."""
    os.environ["MASTER_ADDR"] = address
    os.environ["MASTER_PORT"] = str(port)


def rank_variables(context) -> dict[str, str]:
    """torchrun's variables for this worker, from its Ray Train context."""
    return {"LOCAL_RANK": str(context.get_local_rank()), "LOCAL_WORLD_SIZE": str(context.get_local_world_size()),
            "NODE_RANK": str(context.get_node_rank()), "RANK": str(context.get_world_rank()),
            "WORLD_SIZE": str(context.get_world_size())}


def set_rank_variables() -> None:
    import ray.train

    os.environ.update(rank_variables(ray.train.get_context()))


def nccl_error_handling(environment: dict[str, str] | os._Environ) -> dict[str, str]:
    """What NCCL needs set so that a timed-out collective raises instead of hanging: asynchronous
    error handling, unless one of ``NCCL_ERROR_VARIABLES`` is set already (the user's choice)."""
    if any(name in environment for name in NCCL_ERROR_VARIABLES):
        return {}
    return {NCCL_ERROR_VARIABLES[0]: "1"}


def join_process_group(backend: str, rank: int, world_size: int, timeout_s: int) -> None:
    import torch.distributed as dist

    if backend == "nccl":
        os.environ.update(nccl_error_handling(os.environ))
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))


def leave_process_group(destroy: bool) -> None:
    import torch
    import torch.distributed as dist

    if destroy and dist.is_initialized():
        dist.destroy_process_group()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class CurrentDevice:
    """Around the training function on a worker: its GPU as torch's current device (where it has one)."""

    def __enter__(self):
        import torch

        if torch.cuda.is_available():
            import ray.train.torch

            device = ray.train.torch.get_device()
            if device.type == "cuda":
                torch.cuda.set_device(device)
        return self

    def __exit__(self, *exc_info) -> bool:
        return False


# --------------------------------------------------------------------------- in the controller


def address_and_port() -> tuple[str, int]:
    """This node's address and a port free on it (run on rank 0's worker)."""
    import socket

    import ray.util

    address = ray.util.get_node_ip_address()
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        return address, probe.getsockname()[1]


class ProcessGroupBackend(Backend):
    """What Ray Train's controller does with the workers at the start and the end of a fit."""

    # As Ray's torch backend: the workers of a node see each other's GPUs (NCCL needs them).
    share_cuda_visible_devices = True

    def on_start(self, worker_group, backend_config: ProcessGroupConfig) -> None:
        address, port = worker_group.execute_single(0, address_and_port)
        worker_group.execute(set_rendezvous, address, port)
        worker_group.execute(set_rank_variables)
        ray.get([worker_group.execute_single_async(rank, join_process_group, backend_config.backend, rank,
                                                   len(worker_group), backend_config.timeout_s)
                 for rank in range(len(worker_group))])

    def on_shutdown(self, worker_group, backend_config: ProcessGroupConfig) -> None:
        try:
            ray.get(worker_group.execute_async(leave_process_group, len(worker_group) > 1), timeout=SHUTDOWN_TIMEOUT_S)
        except GetTimeoutError:
            pass  # as Ray's: the workers are stopped next anyway


@dataclasses.dataclass
class ProcessGroupConfig(BackendConfig):
    """``TorchConfig(backend=backend, init_method="env", timeout_s=timeout_s)``, without torch in the
    controller. ``backend``: gloo or nccl (``cohort.worker.grid.exchange_backend``)."""

    backend: str = "gloo"
    timeout_s: int = TIMEOUT_S

    @property
    def backend_cls(self) -> type:
        return ProcessGroupBackend

    @property
    def train_func_context(self) -> type:
        return CurrentDevice

    def to_dict(self) -> dict:
        return {"backend": self.backend, "init_method": "env", "timeout_s": self.timeout_s}
