"""The FISTA schedule and the choice of the form it runs in (training, folded or inference)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch


def fista_momentum(num_steps: int) -> list[float]:
    """Momentum coefficients ``beta_k = (t_k - 1) / t_{k+1}`` for steps ``k = 1 .. num_steps``.

    ``t_1 = 1`` and ``t_{k+1} = (1 + sqrt(1 + 4 t_k^2)) / 2``. They depend only on the step index, so the
    unrolled graph holds them as constants.
    """
    betas, t = [], 1.0
    for _ in range(num_steps):
        t_next = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        betas.append((t - 1.0) / t_next)
        t = t_next
    return betas


FISTA_FORMS = ("training", "inference", "folded")
# lmbda_scale is floored here in the rescaled form (it divides the input): the threshold it leaves at a
# requested 0 moves the codes by about 1e-9, far below float32 parity tolerances.
SCALE_FLOOR = 1e-6
_forced_form: str | None = None


@contextlib.contextmanager
def fista_form(form: str | None) -> Iterator[None]:
    """Encode in one form of FISTA inside the block, whatever the mode: ``"training"``, ``"inference"``
    (what tracing exports: rescaled where the model allows, else folded; see ``CSCLayer._fista_inference``
    and ``CSCLayer._encode_rescaled``) or ``"folded"``. ``None``: the default (``current_form``): the training
    form while gradients are recorded, else the inference form (folded when compiled). For benchmarks and tests."""
    global _forced_form
    if form not in (*FISTA_FORMS, None):
        raise ValueError(f"form must be one of {FISTA_FORMS} or None, got {form!r}")
    previous, _forced_form = _forced_form, form
    try:
        yield
    finally:
        _forced_form = previous


def _is_exporting() -> bool:
    return (
        torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or torch.onnx.is_in_onnx_export()
        or torch.compiler.is_compiling()
    )


def current_form() -> str:
    """The form FISTA runs in now: the forced one, else ``"inference"`` when traced, compiled or run without
    gradients (``torch.no_grad``, ``torch.inference_mode``), else ``"training"``."""
    if _forced_form is not None:
        return _forced_form
    return "inference" if _is_exporting() or not torch.is_grad_enabled() else "training"
