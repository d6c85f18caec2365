"""A peer as an ONNX file: exported with a dynamic batch size, and checked against ONNX Runtime
before anyone is told it worked.

onnx, onnxscript (torch's exporter) and onnxruntime are the optional extra ``export``
(``pip install -e ".[export]"``).
"""
from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from cohort.config.errors import CohortError, first_line

OPSET = 18  # the ONNX opset of every export (ONNX Runtime 1.16 and later run it)
TOLERANCE = 1e-4  # ONNX Runtime's logits against torch's: largest absolute difference allowed
INPUT, OUTPUT = "images", "logits"
EXTRA = 'the ONNX export needs the optional extra "export": pip install -e ".[export]"'
EXTRA_MODULES = ("onnx", "onnxscript", "onnxruntime")


def require_onnx() -> None:
    """One line naming the extra when onnx, onnxscript or onnxruntime is missing."""
    import importlib.util

    missing = [name for name in EXTRA_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise CohortError(f"{EXTRA} ({', '.join(missing)} not installed)", "--format onnx")


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: str | Path, opset: int = OPSET) -> None:
    """Write ``model`` (in eval mode) to ``path`` as ONNX: input ``images`` ``[batch, C, H, W]``,
    output ``logits`` ``[batch, classes]``, the batch size dynamic. ``example``: a batch of
    inputs, of two or more images (a batch of one would fix the size)."""
    require_onnx()
    if len(example) < 2:
        raise ValueError("the example batch needs two or more images (one would fix the batch size)")
    model = model.eval()
    # The exporter reports its steps on stdout and deprecations as warnings: not the user's business.
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset, input_names=[INPUT],
                                    output_names=[OUTPUT], dynamic_shapes=({0: torch.export.Dim("batch")},),
                                    verbose=False)
        program.save(str(path), external_data=False)


@dataclass(frozen=True)
class Check:
    """ONNX Runtime against torch on one batch."""

    images: int
    max_difference: float  # largest absolute difference of the logits
    largest_logit: float  # largest absolute logit (the scale of the difference)

    @property
    def passed(self) -> bool:
        return self.max_difference <= TOLERANCE

    def line(self) -> str:
        verdict = "within" if self.passed else "NOT within"
        return (f"ONNX Runtime vs torch on {self.images} test images: largest logit difference "
                f"{self.max_difference:.2e} ({verdict} {TOLERANCE:g}; largest |logit| {self.largest_logit:.1f})")


def check_onnx(path: str | Path, model: torch.nn.Module, images: torch.Tensor) -> Check:
    """Run the file at ``path`` in ONNX Runtime on ``images`` and compare with ``model``'s logits."""
    require_onnx()
    import onnx
    import onnxruntime

    onnx.checker.check_model(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_logits,) = session.run([OUTPUT], {INPUT: images.numpy()})
    with torch.no_grad():
        expected = model.eval()(images)
    difference = (torch.from_numpy(onnx_logits) - expected).abs().max().item()
    return Check(len(images), difference, expected.abs().max().item())


def export_checked(model: torch.nn.Module, images: torch.Tensor, path: str | Path, opset: int = OPSET) -> Check:
    """Export to a file beside ``path`` and move it there only once ONNX Runtime agrees with torch
    (nothing half-written: a failed export or check leaves no file)."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    try:
        try:
            export_onnx(model, images, partial, opset)
        except CohortError:
            raise
        except Exception as error:  # noqa: BLE001 - the exporter's failures are many
            raise CohortError(f"ONNX export failed: {first_line(error)}", "--format onnx") from None
        check = check_onnx(partial, model, images)
        if not check.passed:
            raise CohortError(f"ONNX export not written: {check.line()}", "--format onnx")
        partial.replace(path)
        return check
    finally:
        partial.unlink(missing_ok=True)
