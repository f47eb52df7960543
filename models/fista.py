r"""FISTA for the convolutional Lasso of one CSC layer: the iteration, its three forms, and the choice of form.

Every form runs one iteration (``_iterate``), from ``z_0 = y_1 = 0``, with the momentum ``beta_k`` taken from
the step index alone (``fista_momentum``), so the unrolled graph has no data-dependent control flow:

    z_k     = prox( gradient_step(y_k) )            # z_1 = prox(eta D^T x): the gradient step at y = 0
    y_{k+1} = z_k + beta_k * (z_k - z_{k-1})

with ``gradient_step(y) = (1 - eta mu) y - eta D^T D y + eta D^T x``. The forms write it differently:

- ``"training"`` (``training_form``): as above, with the soft threshold ``relu(v - t) - relu(-v - t)``:
  what autograd differentiates.
- ``"folded"`` (``folded_form``): what tracing exports (ONNX, TensorRT, ``torch.compile``), with fewer passes
  over the code maps, which outnumber the image channels: ``(1 - eta mu) y + (eta D)^T (x - D y)``, the
  residual formed on the input channels and ``eta`` folded into the analysis weights; 1x1 atoms at stride 1
  apply the Gram step as one matrix, ``(1 - eta mu) I - eta D^T D``, plus ``eta D^T x``; the soft threshold
  is ``v - clip(v, -t, t)``.
- ``"inference"``: the rescaled form (``rescaled_form``: the folded form with one constant threshold) where
  ``rescaled_form_applies``, else the folded form.

All three are equal up to float rounding (tested). The form is an argument (``form``) or, where none is
given, ``current_form()``: the one set by ``fista_form`` in this thread or asyncio task (a context variable),
else the inference form when traced, compiled or run without gradients, and the training form otherwise.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

FISTA_FORMS = ("training", "inference", "folded")
# lmbda_scale is floored here in the rescaled form (it divides the input): the threshold it leaves at a
# requested 0 moves the codes by about 1e-9, far below float32 parity tolerances.
SCALE_FLOOR = 1e-6
_FORM: contextvars.ContextVar[str | None] = contextvars.ContextVar("csc_serve_fista_form", default=None)

# A linear operator of the layer with its dictionary as an argument: ``(input, weight) -> output``.
Operator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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


# ----------------------------------------------------------------------------- the choice of form
@contextlib.contextmanager
def fista_form(form: str | None) -> Iterator[None]:
    """Encode in one form of FISTA inside the block, whatever the mode: ``"training"``, ``"inference"``
    (what tracing exports: rescaled where the model allows, else folded) or ``"folded"``. ``None``: the
    default (``current_form``): the training form while gradients are recorded, else the inference form
    (folded when compiled). The setting is a context variable: it holds for this thread or asyncio task
    only. For benchmarks and tests."""
    if form not in (*FISTA_FORMS, None):
        raise ValueError(f"form must be one of {FISTA_FORMS} or None, got {form!r}")
    token = _FORM.set(form)
    try:
        yield
    finally:
        _FORM.reset(token)


def is_exporting() -> bool:
    """Whether the model is being traced, scripted, exported to ONNX or compiled (not run eagerly)."""
    return (
        torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or torch.onnx.is_in_onnx_export()
        or torch.compiler.is_compiling()
    )


def current_form() -> str:
    """The form FISTA runs in now: the one ``fista_form`` set, else ``"inference"`` when traced, compiled or
    run without gradients (``torch.no_grad``, ``torch.inference_mode``), else ``"training"``."""
    forced = _FORM.get()
    if forced is not None:
        return forced
    return "inference" if is_exporting() or not torch.is_grad_enabled() else "training"


def resolve_form(form: str | None = None) -> str:
    """``form`` itself (one of ``FISTA_FORMS``), or ``current_form()`` where it is ``None``.

    Reading the context variable stops ``torch.compile``'s tracing for a moment (Dynamo cannot trace it), so
    the models read it once, at the top of a call, and pass the form down as an argument."""
    if form is None:
        return current_form()
    if form not in FISTA_FORMS:
        raise ValueError(f"form must be one of {FISTA_FORMS} or None, got {form!r}")
    return form


def rescaled_form_applies(x: torch.Tensor, lmbda_weights: torch.Tensor, form: str | None = None) -> bool:
    """The rescaled form runs for the inference form outside ``torch.compile`` (which fuses the elementwise
    passes itself), in float32 or bfloat16 (float16 cannot hold the rescaled input of small scales), with
    penalty weights that all divide safely. Decided on constants, so a trace stays valid."""
    if resolve_form(form) != "inference" or torch.compiler.is_compiling() or x.dtype == torch.float16:
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # a property of the weights, not the data
        w = lmbda_weights.detach()
        return bool(w.min() > 1e-4 * w.max())


# ----------------------------------------------------------------------------- the iteration
@dataclass(frozen=True)
class ConvLasso:
    r"""One layer's Lasso as FISTA sees it, less the input, the dictionary and the thresholds.

    ``analysis(x, W)`` is ``W^T x``, (B, C, H, W) -> (B, K, H/s, W/s), and ``synthesis(z, W)`` its exact
    adjoint ``W z``, for any dictionary ``W`` of the layer's shape. ``step_size`` is ``eta = 1 / (L + mu)``
    (a 0-d tensor), ``momentum`` the ``fista_momentum`` of the number of steps, ``num_atoms`` is ``K`` and
    ``mu`` the ridge weight.
    ``pointwise``: 1x1 atoms at stride 1, whose Gram operator ``D^T D`` is one K x K matrix.
    """

    analysis: Operator
    synthesis: Operator
    step_size: torch.Tensor
    momentum: Sequence[float]
    num_atoms: int
    mu: float = 0.0
    nonnegative: bool = True
    pointwise: bool = False


def _iterate(
    b: torch.Tensor,
    gradient_step: Callable[[torch.Tensor], torch.Tensor],
    prox: Callable[[torch.Tensor], torch.Tensor],
    momentum: Sequence[float],
) -> torch.Tensor:
    """The FISTA loop, every form's: ``b`` is the gradient step at ``y = 0``, ``eta D^T x``."""
    z = prox(b)  # step 1 starts from z_0 = y_1 = 0
    z_prev = z
    for beta in momentum[1:]:
        y = z + beta * (z - z_prev) if beta else z
        z_prev = z
        z = prox(gradient_step(y))
    return z


def solve(x: torch.Tensor, weight: torch.Tensor, thresh: torch.Tensor, lasso: ConvLasso,
          form: str | None = None) -> torch.Tensor:
    """Codes of ``x`` for the dictionary ``weight`` and per-sample, per-atom thresholds ``thresh``
    (B, K, 1, 1): the training form for ``form`` (default ``current_form()``) ``"training"``, else folded."""
    if resolve_form(form) == "training":
        return training_form(x, weight, thresh, lasso)
    return folded_form(x, weight, thresh, lasso)


def training_form(x: torch.Tensor, weight: torch.Tensor, thresh: torch.Tensor, lasso: ConvLasso) -> torch.Tensor:
    """The training form: ``prox((1 - eta mu) y - eta D^T D y + eta D^T x)``, soft threshold ``relu``s."""
    analysis, synthesis = lasso.analysis, lasso.synthesis
    eta = lasso.step_size.to(x.dtype)
    shrink = 1.0 - eta * lasso.mu
    b = eta * analysis(x, weight)  # eta * D^T x, constant across steps

    def gradient_step(y: torch.Tensor) -> torch.Tensor:
        return shrink * y - eta * analysis(synthesis(y, weight), weight) + b

    def prox(v: torch.Tensor) -> torch.Tensor:
        if lasso.nonnegative:
            return F.relu(v - thresh)
        return F.relu(v - thresh) - F.relu(-v - thresh)

    return _iterate(b, gradient_step, prox, lasso.momentum)


def folded_form(x: torch.Tensor, weight: torch.Tensor, thresh: torch.Tensor, lasso: ConvLasso) -> torch.Tensor:
    """The folded form (module docstring) with per-sample, per-atom thresholds ``thresh`` (B, K, 1, 1)."""
    eta = lasso.step_size.to(x.dtype)
    gram = _pointwise_gram(weight, eta, lasso, x.dtype) if lasso.pointwise else None

    def prox(v: torch.Tensor) -> torch.Tensor:
        if lasso.nonnegative:
            return F.relu(v - thresh)
        return v - torch.minimum(torch.maximum(v, -thresh), thresh)

    return _folded(x, weight, eta * weight, eta, gram, prox, lasso)


def rescaled_form(x: torch.Tensor, dictionary: torch.Tensor, lmbda_weights: torch.Tensor, lmbda: float,
                  scale: torch.Tensor | None, lasso: ConvLasso) -> torch.Tensor:
    r"""The folded form with one constant threshold, so the soft threshold is one Clip: two passes.

    FISTA is positively homogeneous: every step is linear in ``(x, y)`` except the threshold, and
    ``prox_{s t}(s v) = s prox_t(v)`` for ``s > 0``. So the codes at scale ``s`` (``scale``, shape
    (B, 1, 1, 1), or ``None`` for 1) are ``s`` times the codes of ``x / s`` at scale 1. With ``u_k = z_k / w_k``
    the per-atom weights ``w = lmbda_weights`` move into the dictionary (synthesis ``D diag(w)``, analysis
    ``diag(1/w) D^T``; the 1x1 Gram step becomes ``diag(1/w) G diag(w)``) and every atom shares the threshold
    ``eta * lmbda``. Then ``z = s * w * u``. Needs ``w > 0`` (``rescaled_form_applies``).
    """
    w = lmbda_weights.to(x.dtype)
    multiplier = w.view(1, -1, 1, 1)  # (1, K, 1, 1)
    if scale is not None:
        scale = scale.clamp(min=SCALE_FLOOR)  # (B, 1, 1, 1)
        x = x / scale
        multiplier = multiplier * scale  # (B, K, 1, 1)
    eta = lasso.step_size.to(x.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # a constant of the exported graph
        threshold = float(eta * lmbda)
    gram = None
    if lasso.pointwise:
        gram = _pointwise_gram(dictionary, eta, lasso, x.dtype) * w.view(1, -1) / w.view(-1, 1)

    def prox(v: torch.Tensor) -> torch.Tensor:
        # A constant: one Clip node (ONNX Runtime's Shrink kernel is scalar code).
        return F.relu(v - threshold) if lasso.nonnegative else v - v.clamp(-threshold, threshold)

    synthesis = dictionary * w.view(-1, 1, 1, 1)  # D diag(w)
    analysis = eta * dictionary / w.view(-1, 1, 1, 1)  # eta diag(1/w) D^T
    return _folded(x, synthesis, analysis, eta, gram, prox, lasso) * multiplier


def _pointwise_gram(weight: torch.Tensor, eta: torch.Tensor, lasso: ConvLasso, dtype: torch.dtype) -> torch.Tensor:
    """The Gram step of 1x1 atoms at stride 1 as one matrix, ``(1 - eta mu) I - eta D^T D``: (K, K)."""
    d = weight.to(dtype).flatten(1)  # (K, C)
    eye = torch.eye(lasso.num_atoms, dtype=dtype, device=d.device)
    return (1.0 - eta * lasso.mu) * eye - eta * (d @ d.t())


def _folded(x: torch.Tensor, synthesis_weight: torch.Tensor, analysis_weight: torch.Tensor, eta: torch.Tensor,
            gram: torch.Tensor | None, prox: Callable[[torch.Tensor], torch.Tensor], lasso: ConvLasso) -> torch.Tensor:
    """The folded iteration: ``analysis_weight`` holds ``eta`` (and, rescaled, ``1/w``); ``gram`` is the
    pointwise Gram step matrix (K, K), or ``None`` for the convolutional step."""
    analysis, synthesis = lasso.analysis, lasso.synthesis
    b = analysis(x, analysis_weight)  # eta * D^T x, constant across steps
    if gram is not None:
        gram_step = gram.view(lasso.num_atoms, lasso.num_atoms, 1, 1)

        def gradient_step(y: torch.Tensor) -> torch.Tensor:
            return F.conv2d(y, gram_step) + b
    else:
        keep = 1.0 - eta * lasso.mu if lasso.mu else None

        def gradient_step(y: torch.Tensor) -> torch.Tensor:
            start = y * keep if keep is not None else y
            # eta D^T (x - D y): the subtraction happens on the C input channels, not the K code maps.
            return analysis(x - synthesis(y, synthesis_weight), analysis_weight) + start

    return _iterate(b, gradient_step, prox, lasso.momentum)
