r"""FISTA for the convolutional Lasso of one CSC layer: the iteration, its three forms, and the choice of form.

Every form runs one iteration (``_iterate``), from ``z_0 = y_1 = 0``, with the momentum ``beta_k`` taken from
the step index alone (``fista_momentum``), so the unrolled graph has no data-dependent control flow:

    z_k     = prox( gradient_step(y_k) )            # z_1 = prox(eta D^T x): the gradient step at y = 0
    y_{k+1} = z_k + beta_k * (z_k - z_{k-1})

with ``gradient_step(y) = (1 - eta mu) y - eta D^T D y + eta D^T x`` and ``prox`` the soft threshold at
``eta * lmbda * w * lmbda_scale`` (per atom, per sample). A layer with learned steps (``StageConfig.learned_steps``,
as in analytic LISTA: the dictionary stays the layer's own, only scalars are learned) takes step ``k`` with its
own step size and threshold, ``alpha_k`` and ``tau_k`` (``ConvLasso.step_scales``, ``threshold_scales``)::

    eta_k   = alpha_k / (L + mu)
    z_k     = prox_{eta_k tau_k lmbda w lmbda_scale}( (1 - eta_k mu) y_k - eta_k D^T D y_k + eta_k D^T x )

``alpha_k = tau_k = 1`` is plain FISTA. A layer with per-atom thresholds (``StageConfig.thresholds``
``"per_atom"``) learns ``tau_k`` per atom, ``tau_kj``; with ``"noise_affine"`` it also learns a slope per step
and atom, ``rho_kj``, and the threshold of sample ``b`` follows its noise level ``sigma_b`` (the image's
noise std, on the scale of its values), as in CDLNet::

    prox threshold of atom j at step k:   eta_k lmbda w_j lmbda_scale_b relu(tau_kj + rho_kj sigma_b)

A layer with a ``neighbourhood`` ``n`` (``StageConfig.neighbourhood``, per-atom thresholds only) also learns an
exponent ``gamma_kj`` per step and atom, and the threshold ``t_kj`` above becomes one per code position
``p``, set by the energy of the gradient step ``v`` over the ``n x n`` positions ``N(p)`` around ``p`` (those
inside the code map)::

    s_jp     = sqrt( mean_{q in N(p)} v_jq^2 )
    t_kjp    = t_kj exp( gamma_kj clip( log((t_kj + 1e-8) / (s_jp + 1e-8)), -3, 3 ) )

so that ``t_kjp = t_kj (t_kj / s_jp)^gamma_kj`` within the clip: with ``gamma > 0`` a code whose neighbours
carry energy well above the threshold (an edge or a texture that spans several positions) is thresholded
less, and an isolated one (noise) more. Each step is then the proximal-gradient step of a weighted Lasso
whose weights come from the current iterate (a reweighted l1 step); ``gamma = 0`` is the Lasso above.
The energy is computed in float32 whatever the dtype of the codes.

The forms write it differently:

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
    ``step_scales`` and ``threshold_scales``: ``alpha_k`` and ``tau_k`` of every step (tensors of shape
    ``(num_steps,)``; per-atom thresholds: ``(num_steps, K)``), or ``None`` for plain FISTA (both 1).
    ``threshold_slopes``: ``rho_kj`` of noise-affine thresholds, ``(num_steps, K)``, or ``None``; ``noise``:
    ``sigma_b`` of every sample, ``(B,)`` on the scale of the input's values (``None``: 0).
    ``threshold_exponents``: ``gamma_kj``, ``(num_steps, K)``, and ``neighbourhood`` its window ``n``, or
    ``None`` and 0 (thresholds that do not depend on the position).
    """

    analysis: Operator
    synthesis: Operator
    step_size: torch.Tensor
    momentum: Sequence[float]
    num_atoms: int
    mu: float = 0.0
    nonnegative: bool = True
    pointwise: bool = False
    step_scales: torch.Tensor | None = None
    threshold_scales: torch.Tensor | None = None
    threshold_slopes: torch.Tensor | None = None
    noise: torch.Tensor | None = None
    threshold_exponents: torch.Tensor | None = None
    neighbourhood: int = 0

    @property
    def per_atom(self) -> bool:
        """Whether the threshold scales differ between atoms (then no form folds them into the dictionary)."""
        return self.threshold_scales is not None and self.threshold_scales.dim() == 2

    def step_factors(self, dtype: torch.dtype) -> tuple[list, list]:
        """``alpha_k`` for every step as 0-d tensors, and the threshold factor of every step: ``alpha_k tau_k``
        (0-d), or per atom ``alpha_k tau_kj`` (1, K, 1, 1), or noise-affine ``alpha_k relu(tau_kj + rho_kj
        sigma_b)`` (B, K, 1, 1). Plain FISTA: ``None``, a factor of 1."""
        steps = len(self.momentum)
        if self.step_scales is None:
            return [None] * steps, [None] * steps
        alpha, tau = self.step_scales.to(dtype), self.threshold_scales.to(dtype)
        if not self.per_atom:
            return list(alpha.unbind()), list((alpha * tau).unbind())
        tau = tau.view(steps, 1, -1, 1, 1)  # (steps, 1, K, 1, 1)
        if self.threshold_slopes is not None and self.noise is not None:
            sigma = self.noise.to(dtype).view(1, -1, 1, 1, 1)  # (1, B, 1, 1, 1)
            tau = F.relu(tau + self.threshold_slopes.to(dtype).view(steps, 1, -1, 1, 1) * sigma)  # (steps, B, K, 1, 1)
        return list(alpha.unbind()), list((alpha.view(-1, 1, 1, 1, 1) * tau).unbind())


def _times(value: torch.Tensor, factor: torch.Tensor | float | None) -> torch.Tensor:
    return value if factor is None else value * factor


def local_thresholds(v: torch.Tensor, t: torch.Tensor, exponent: torch.Tensor, window: int) -> torch.Tensor:
    """The per-position thresholds ``t_kjp`` of one step (module docstring): ``v`` the gradient step (B, K, H, W),
    ``t`` the step's thresholds (B or 1, K, 1, 1), ``exponent`` its ``gamma_kj`` (K,)."""
    v32, t32 = v.float(), t.float()
    energy = F.avg_pool2d(v32 * v32, window, 1, window // 2, count_include_pad=False)
    spread = (energy + 1e-12).sqrt()
    ratio = ((t32 + 1e-8) / (spread + 1e-8)).log().clamp(-3.0, 3.0)
    return (t32 * torch.exp(exponent.float().view(1, -1, 1, 1) * ratio)).to(v.dtype)


def _step_thresholds(v: torch.Tensor, t: torch.Tensor, lasso: ConvLasso, k: int) -> torch.Tensor:
    """``t`` itself, or per position where the layer has a neighbourhood."""
    if lasso.threshold_exponents is None:
        return t
    return local_thresholds(v, t, lasso.threshold_exponents[k], lasso.neighbourhood)


def _iterate(
    b: torch.Tensor,
    gradient_step: Callable[[torch.Tensor, int], torch.Tensor],
    prox: Callable[[torch.Tensor, int], torch.Tensor],
    momentum: Sequence[float],
) -> torch.Tensor:
    """The FISTA loop, every form's: ``b`` is the gradient step of step 1, at ``y = 0`` (``eta_1 D^T x``);
    ``gradient_step(y, k)`` and ``prox(v, k)`` are those of step ``k`` (0-based)."""
    z = prox(b, 0)  # step 1 starts from z_0 = y_1 = 0
    z_prev = z
    for k in range(1, len(momentum)):
        beta = momentum[k - 1]  # beta_k of y_{k+1} = z_k + beta_k (z_k - z_{k-1}), 1-based k; beta_1 = 0
        y = z + beta * (z - z_prev) if beta else z
        z_prev = z
        z = prox(gradient_step(y, k), k)
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
    alphas, thresh_factors = lasso.step_factors(x.dtype)
    eta = lasso.step_size.to(x.dtype)
    b = eta * analysis(x, weight)  # eta * D^T x, constant across steps

    def gradient_step(y: torch.Tensor, k: int) -> torch.Tensor:
        eta_k = _times(eta, alphas[k])
        return (1.0 - eta_k * lasso.mu) * y - eta_k * analysis(synthesis(y, weight), weight) + _times(b, alphas[k])

    def prox(v: torch.Tensor, k: int) -> torch.Tensor:
        t = _step_thresholds(v, _times(thresh, thresh_factors[k]), lasso, k)
        if lasso.nonnegative:
            return F.relu(v - t)
        return F.relu(v - t) - F.relu(-v - t)

    return _iterate(_times(b, alphas[0]), gradient_step, prox, lasso.momentum)


def folded_form(x: torch.Tensor, weight: torch.Tensor, thresh: torch.Tensor, lasso: ConvLasso) -> torch.Tensor:
    """The folded form (module docstring) with per-sample, per-atom thresholds ``thresh`` (B, K, 1, 1)."""
    eta = lasso.step_size.to(x.dtype)
    _, thresh_factors = lasso.step_factors(x.dtype)

    def prox(v: torch.Tensor, k: int) -> torch.Tensor:
        t = _step_thresholds(v, _times(thresh, thresh_factors[k]), lasso, k)
        if lasso.nonnegative:
            return F.relu(v - t)
        return v - torch.minimum(torch.maximum(v, -t), t)

    return _folded(x, weight, lambda eta_k: eta_k * weight, eta, weight, prox, lasso)


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
    _, thresh_factors = lasso.step_factors(x.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # constants of the exported graph
        thresholds = [float(_times(eta * lmbda, f)) for f in thresh_factors]

    def prox(v: torch.Tensor, k: int) -> torch.Tensor:
        # A constant: one Clip node (ONNX Runtime's Shrink kernel is scalar code).
        t = thresholds[k]
        return F.relu(v - t) if lasso.nonnegative else v - v.clamp(-t, t)

    synthesis = dictionary * w.view(-1, 1, 1, 1)  # D diag(w)
    atom_weights = w.view(-1, 1, 1, 1)

    def analysis(eta_k: torch.Tensor) -> torch.Tensor:
        return eta_k * dictionary / atom_weights  # eta_k diag(1/w) D^T

    gram_weights = (w.view(1, -1), w.view(-1, 1)) if lasso.pointwise else None
    return _folded(x, synthesis, analysis, eta, dictionary, prox, lasso, gram_weights) * multiplier


def _pointwise_gram(weight: torch.Tensor, eta: torch.Tensor, lasso: ConvLasso, dtype: torch.dtype) -> torch.Tensor:
    """The Gram step of 1x1 atoms at stride 1 as one matrix, ``(1 - eta mu) I - eta D^T D``: (K, K)."""
    d = weight.to(dtype).flatten(1)  # (K, C)
    eye = torch.eye(lasso.num_atoms, dtype=dtype, device=d.device)
    return (1.0 - eta * lasso.mu) * eye - eta * (d @ d.t())


def _folded(x: torch.Tensor, synthesis_weight: torch.Tensor, analysis_weight: Callable[[torch.Tensor], torch.Tensor],
            eta: torch.Tensor, dictionary: torch.Tensor, prox: Callable[[torch.Tensor, int], torch.Tensor],
            lasso: ConvLasso, gram_weights: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The folded iteration. Step ``k`` analyses with ``analysis_weight(eta_k)`` (``eta_k`` folded into the
    weights; rescaled, ``1/w`` too); a pointwise layer steps with the Gram matrix of ``dictionary``, conjugated
    by ``gram_weights`` (``diag(1/w) G diag(w)``) when given. Plain FISTA has one step size, so one set of
    weights serves every step."""
    analysis, synthesis = lasso.analysis, lasso.synthesis
    alphas, _ = lasso.step_factors(x.dtype)
    plain = lasso.step_scales is None
    etas = [eta] if plain else [eta * a for a in alphas]
    per_step = len(lasso.momentum) if plain else 1  # each list below holds one entry per step
    if lasso.pointwise:
        grams = [_pointwise_gram(dictionary, e, lasso, x.dtype) for e in etas]
        if gram_weights is not None:
            grams = [g * gram_weights[0] / gram_weights[1] for g in grams]
        gram_steps = [g.view(lasso.num_atoms, lasso.num_atoms, 1, 1) for g in grams] * per_step
        b = analysis(x, analysis_weight(eta))  # eta D^T x; step k adds alpha_k times it
        offsets = [b] * per_step if plain else [b * a for a in alphas]

        def gradient_step(y: torch.Tensor, k: int) -> torch.Tensor:
            return F.conv2d(y, gram_steps[k]) + offsets[k]

        return _iterate(offsets[0], gradient_step, prox, lasso.momentum)

    analysis_weights = [analysis_weight(e) for e in etas] * per_step
    keeps = [1.0 - e * lasso.mu if lasso.mu else None for e in etas] * per_step

    def gradient_step(y: torch.Tensor, k: int) -> torch.Tensor:
        start = y * keeps[k] if keeps[k] is not None else y
        # eta_k D^T (x - D y): the subtraction happens on the C input channels, not the K code maps.
        return analysis(x - synthesis(y, synthesis_weight), analysis_weights[k]) + start

    return _iterate(analysis(x, analysis_weights[0]), gradient_step, prox, lasso.momentum)
