"""The process group's backend of a cohort's fit (cohort.driver.process_group): what the workers get,
decided without Ray; the Ray path (gloo between real workers) runs in every Ray test, and the
controller's torch-free start is checked in tests/test_faults.py."""
from __future__ import annotations

import pickle
import pickletools

from cohort.driver import process_group
from cohort.driver.process_group import ProcessGroupBackend, ProcessGroupConfig, nccl_error_handling, rank_variables


class Context:
    """A Ray Train context of rank 3 of 4, the second of two on the second node."""

    def get_world_rank(self):
        return 3

    def get_world_size(self):
        return 4

    def get_local_rank(self):
        return 1

    def get_local_world_size(self):
        return 2

    def get_node_rank(self):
        return 1


def test_each_worker_gets_torchruns_variables_from_its_context():
    assert rank_variables(Context()) == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                                         "NODE_RANK": "1"}


def test_nccl_raises_on_a_timeout_unless_the_user_chose_otherwise():
    assert nccl_error_handling({}) == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
    assert nccl_error_handling({"TORCH_NCCL_ASYNC_ERROR_HANDLING": "0"}) == {}
    assert nccl_error_handling({"TORCH_NCCL_BLOCKING_WAIT": "1"}) == {}


def test_the_config_says_what_torchconfig_would():
    config = ProcessGroupConfig(backend="nccl")
    assert config.backend_cls is ProcessGroupBackend and ProcessGroupBackend.share_cuda_visible_devices
    assert config.to_dict() == {"backend": "nccl", "init_method": "env", "timeout_s": 1800}
    assert config.train_func_context is process_group.CurrentDevice
    with config.train_func_context():  # no GPU here: nothing to set
        pass


def test_the_controller_unpickles_the_config_from_a_module_without_torch():
    # Pickled by reference to cohort.driver.process_group, which imports no torch (its source says so:
    # a torch import at the top would defeat it).
    import ray.cloudpickle

    payload = ray.cloudpickle.dumps(ProcessGroupConfig(backend="gloo"))
    names = [argument for _, argument, _ in pickletools.genops(payload) if isinstance(argument, str)]
    assert "cohort.driver.process_group" in names and not any(name.startswith("torch") for name in names), names
    top = [line for line in process_group.__loader__.get_source(process_group.__name__).splitlines()
           if line.startswith(("import ", "from "))]
    assert not any("torch" in line.split()[1] for line in top), top
    assert pickle.loads(pickle.dumps(ProcessGroupConfig(backend="gloo", timeout_s=5))) == ProcessGroupConfig("gloo", 5)
