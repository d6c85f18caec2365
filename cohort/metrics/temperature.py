"""Post-hoc temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017).

One temperature T > 0 per network, fitted on the validation split's logits to minimize their
negative log-likelihood, then applied to the test logits: ``softmax(z / T)``. Accuracy cannot
change (the arg max is the same); the calibration metrics are reported again with a ``_ts`` suffix.

The fit is deterministic: Brent's bounded scalar search (scipy) over log T in
``[log T_MIN, log T_MAX]``, in float64. The NLL of ``z / T`` is convex in 1/T (a log-sum-exp of
a linear function minus a linear function), so it has one minimum along log T, which the search
finds to ``XTOL`` in log T. A cohort's ensemble (a mean of probabilities) is scaled as the logits
``log p̄``.

Pure functions of tensors: no Ray, no MLflow.
"""
from __future__ import annotations

import math

import torch

T_MIN, T_MAX = 0.05, 20.0
XTOL = 1e-7
CALIBRATED = ("ece", "adaece", "nll", "brier")  # the metrics reported again after scaling, as <metric>_ts
TEMPERATURE_KEY = "ts_temperature"
TINY = torch.finfo(torch.float64).tiny


def nll_at(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    """Mean negative log-likelihood of ``softmax(logits / temperature)``, in float64."""
    scaled = logits.double() / temperature
    return float(torch.nn.functional.cross_entropy(scaled, labels))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature in ``[T_MIN, T_MAX]`` that minimizes the NLL of ``logits / T`` on ``labels``."""
    from scipy.optimize import minimize_scalar

    if len(labels) == 0:
        raise ValueError("no validation samples to fit a temperature on")
    logits = logits.detach().double().cpu()
    labels = labels.cpu()
    result = minimize_scalar(lambda log_t: nll_at(logits, labels, math.exp(log_t)),
                             bounds=(math.log(T_MIN), math.log(T_MAX)), method="bounded",
                             options={"xatol": XTOL, "maxiter": 500})
    return float(math.exp(result.x))


def log_probs_of(probs: torch.Tensor) -> torch.Tensor:
    """Probabilities as logits (``log p``, clamped away from 0): an ensemble's scores to scale."""
    return probs.double().clamp_min(TINY).log()


def scaled_metrics(val_logits: torch.Tensor, val_labels: torch.Tensor, test_logits: torch.Tensor,
                   test_labels: torch.Tensor, groups=None, group_names=None) -> dict[str, float]:
    """Fit T on the validation logits; the test metrics at T as ``<metric>_ts``, and T itself."""
    from cohort.metrics import scores as metrics

    temperature = fit_temperature(val_logits, val_labels)
    scaled = metrics.evaluate(test_logits.double() / temperature, test_labels, groups, group_names)
    return {TEMPERATURE_KEY: temperature, **{f"{name}_ts": scaled[name] for name in CALIBRATED}}


def validation_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """``val_acc`` and ``val_nll`` of logits on the validation split."""
    if len(labels) == 0:
        return {}
    return {"val_acc": float((logits.argmax(dim=1) == labels).double().mean()),
            "val_nll": nll_at(logits, labels, 1.0)}
