"""One convolutional sparse coding layer: a learned dictionary and an unrolled FISTA encoder."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .config import PADDING_MODES
from .fista import ConvLasso, fista_momentum, is_exporting, rescaled_form, rescaled_form_applies, resolve_form, solve

MAX_STEP_SCALE = 2.0  # learned step sizes alpha_k / (L + mu) stay at or below 2 / (L + mu)


def _fold_circular(y: torch.Tensor, pad: int, dim: int) -> torch.Tensor:
    """Adjoint of circular padding by ``pad`` on both sides of ``dim``: wrap the borders back and add.

    Needs at least ``2 * pad`` samples between the borders (``CSCLayer`` checks image sizes).
    """
    if pad == 0:
        return y
    size = y.shape[dim] - 2 * pad
    left, middle, right = y.narrow(dim, 0, pad), y.narrow(dim, pad, size), y.narrow(dim, pad + size, pad)
    # The right border holds copies of the first `pad` samples, the left border of the last `pad`.
    head = middle.narrow(dim, 0, pad) + right
    tail = middle.narrow(dim, size - pad, pad) + left
    return torch.cat([head, middle.narrow(dim, pad, size - 2 * pad), tail], dim=dim)


class CSCLayer(nn.Module):
    r"""Convolutional sparse coding with a learned dictionary, encoded by ``num_steps`` FISTA steps.

    The dictionary ``D`` holds ``num_atoms`` filters of shape ``(in_channels, kernel_size, kernel_size)``.
    Synthesis is a true convolution of each code map with its atom, summed over atoms, with stride ``s``:

        decode(z) = conv_transpose2d(z, D, stride=s)        # (B, K, H/s, W/s) -> (B, C, H, W)

    and analysis ``D^T x = conv2d(x, D, stride=s)`` is its exact adjoint for both boundaries
    (``"zeros"``: the image is zero outside its support; ``"circular"``: the image is periodic).

    ``encode`` solves the (atom-weighted) elastic-net Lasso

        min_z  0.5 * ||x - D z||^2 + lmbda * sum_k w_k ||z_k||_1 + mu / 2 * ||z||^2    (and z >= 0 if nonnegative)

    with FISTA, step size ``eta = 1 / (L + mu)`` where ``L = ||D^T D||_2``:

        z_k     = prox_{eta * lmbda * w}( (1 - eta * mu) * y_k - eta * D^T D y_k + eta * D^T x )
        y_{k+1} = z_k + beta_k * (z_k - z_{k-1})

    With ``learned_steps`` step ``k`` has its own step ``eta_k = alpha_k / (L + mu)`` and threshold scale ``tau_k``
    (``step_scales[k]``, ``threshold_scales[k]``; analytic LISTA: the dictionary unchanged, 1 and 1 is plain
    FISTA). ``thresholds="per_atom"`` learns ``tau_kj`` per step and atom, ``"noise_affine"`` also a slope
    ``rho_kj = threshold_slopes[k, j]`` on the noise std ``sigma_b`` of each sample (``encode(..., noise=)``),
    and ``neighbourhood`` ``n`` an exponent ``gamma_kj = threshold_exponents[k, j]`` on the energy of the
    ``n x n`` codes around each code (a reweighted l1 step). Slopes and exponents start at 0; the equations are
    in ``csc_serve.models.fista``.

    ``prox`` is the soft threshold of code map ``k`` at ``eta * lmbda * w_k`` (or
    ``relu(v - eta * lmbda * w_k)`` for non-negative codes). The weights ``w = lmbda_weights`` (one per atom,
    non-negative, 1 by default) are learned with the dictionary: atoms that carry image structure above the
    noise, such as the smooth ones, learn small weights, the rest large ones. ``eta * D^T x`` is computed
    once; the momentum ``beta_k`` comes from the step index alone (``fista_momentum``); ``L`` is a buffer
    refreshed by ``update_step_size`` outside the forward pass, so the unrolled graph has no data-dependent
    control flow. The iteration itself, in its training, folded and rescaled forms, is
    ``csc_serve.models.fista``; the layer holds the dictionary, the step size and the operators.
    """

    def __init__(
        self,
        in_channels: int,
        num_atoms: int,
        kernel_size: int,
        stride: int = 1,
        lmbda: float = 0.1,
        num_steps: int = 2,
        padding_mode: str = "zeros",
        nonnegative: bool = True,
        mu: float = 0.0,
        learned_steps: bool = False,
        thresholds: str = "shared",
        neighbourhood: int = 0,
    ):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
        if stride < 1 or stride > kernel_size:
            raise ValueError(f"stride must be between 1 and kernel_size ({kernel_size}), got {stride}")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        if in_channels < 1 or num_atoms < 1:
            raise ValueError("in_channels and num_atoms must be positive")
        if num_steps < 1:
            raise ValueError(f"num_steps must be at least 1, got {num_steps}")
        if lmbda < 0 or mu < 0:
            raise ValueError(f"lmbda and mu must be non-negative, got lmbda={lmbda}, mu={mu}")
        if thresholds not in ("shared", "per_atom", "noise_affine"):
            raise ValueError(f"thresholds must be 'shared', 'per_atom' or 'noise_affine', got {thresholds!r}")
        if thresholds != "shared" and not learned_steps:
            raise ValueError(f"thresholds {thresholds!r} needs learned_steps")
        if neighbourhood < 0 or (neighbourhood and (neighbourhood % 2 == 0 or thresholds == "shared")):
            raise ValueError(f"neighbourhood must be 0 or odd, with per-atom thresholds, got {neighbourhood}")
        self.in_channels = in_channels
        self.num_atoms = num_atoms
        self.kernel_size = kernel_size
        self.stride = stride
        self.lmbda = float(lmbda)
        self.num_steps = num_steps
        self.padding_mode = padding_mode
        self.nonnegative = nonnegative
        self.mu = float(mu)
        self.learned_steps = bool(learned_steps)
        self.thresholds = thresholds
        self.neighbourhood = int(neighbourhood)
        self.padding = (kernel_size - 1) // 2
        # Fine enough to sample the Fourier symbol of D^T D near its peak.
        self.power_grid = max(32, 4 * -(-kernel_size // stride))
        self.momentum = fista_momentum(num_steps)

        self.dictionary = nn.Parameter(torch.randn(num_atoms, in_channels, kernel_size, kernel_size))
        # Per-atom weights of the l1 penalty (the threshold of atom k is eta * lmbda * w_k * lmbda_scale).
        self.lmbda_weights = nn.Parameter(torch.ones(num_atoms))
        if self.learned_steps:  # alpha_k and tau_k (or tau_kj) of every step
            self.step_scales = nn.Parameter(torch.ones(num_steps))
            per_atom = (num_atoms,) if thresholds != "shared" else ()
            self.threshold_scales = nn.Parameter(torch.ones(num_steps, *per_atom))
        if thresholds == "noise_affine":  # rho_kj
            self.threshold_slopes = nn.Parameter(torch.zeros(num_steps, num_atoms))
        if self.neighbourhood:  # gamma_kj
            self.threshold_exponents = nn.Parameter(torch.zeros(num_steps, num_atoms))
        # Largest eigenvalue of D^T D (a bound for every image size); the FISTA step is 1 / (L + mu).
        # Computed on first use (or loaded with the weights), so building a model to load into is cheap.
        self.register_buffer("lipschitz", torch.ones(()))
        # Warm start of the power iteration: one code map on a circular grid of power_grid samples.
        self.register_buffer("_power_vector", torch.empty(0), persistent=False)
        self._synced_with: tuple[int, int] | None = None
        self.normalize_dictionary()

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.num_atoms}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"lmbda={self.lmbda}, num_steps={self.num_steps}, padding_mode={self.padding_mode!r}, "
            f"nonnegative={self.nonnegative}, mu={self.mu}" + (", learned_steps=True" if self.learned_steps else "")
            + (f", thresholds={self.thresholds!r}" if self.thresholds != "shared" else "")
        )

    @property
    def noise_adaptive(self) -> bool:
        """Whether the thresholds follow the noise level of the input (``thresholds="noise_affine"``)."""
        return self.thresholds == "noise_affine"

    # ----------------------------------------------------------------------------- dictionary upkeep
    @torch.no_grad()
    def normalize_dictionary(self) -> None:
        """Project every atom onto the unit sphere (call after each optimizer step, then ``update_step_size``)."""
        norms = self.dictionary.flatten(1).norm(dim=1).clamp_min(1e-12)
        self.dictionary.div_(norms.view(-1, 1, 1, 1))

    @property
    def step_size(self) -> torch.Tensor:
        """The FISTA step ``1 / (L + mu)``."""
        return 1.0 / (self.lipschitz + self.mu)

    @torch.no_grad()
    def update_step_size(self, num_iters: int | None = None, margin: float = 0.02) -> float:
        """Refresh ``L``, the largest eigenvalue of ``decode^T decode``, by power iteration.

        The iteration runs on the circular operator over a ``power_grid`` x ``power_grid`` code grid,
        whose spectrum samples the Fourier symbol of ``D^T D``; the symbol's supremum bounds ``L`` for
        every image size and both boundaries. The Rayleigh quotient approaches it from below, so the stored
        value is raised by ``margin`` (relative).

        With ``num_iters=None`` the iteration starts afresh and runs until the estimate stops rising
        (for a dictionary that may have changed arbitrarily). With a number, it warm-starts from the last
        vector for exactly that many iterations: cheap tracking of the small changes of one optimizer step.
        """
        weight = self.dictionary.detach()
        shape = (1, self.num_atoms, self.power_grid, self.power_grid)
        v = self._power_vector
        cold = num_iters is None or v.shape != shape or v.dtype != weight.dtype or v.device != weight.device
        if cold:
            gen = torch.Generator().manual_seed(0)
            v = torch.randn(shape, generator=gen, dtype=torch.float64).to(weight)
        # Without a vector to start from (first call, new shape or device), a few iterations would
        # underestimate L and let FISTA diverge: converge instead.
        min_iters, max_iters = (100, 2000) if cold else (num_iters, num_iters)
        history: list[float] = []
        for i in range(max_iters):
            v = v / v.norm().clamp_min(1e-30)
            w = self._gram(v, weight, "circular")
            history.append(float((v * w).sum()))
            v = w
            # Converged when ten more iterations raise the estimate by less than 1e-6 of it.
            if i >= min_iters and history[-1] - history[-11] <= 1e-6 * abs(history[-1]):
                break
        self._power_vector = v / v.norm().clamp_min(1e-30)
        self.lipschitz.fill_(max(history) * (1.0 + margin))
        self._mark_synced()
        return float(self.lipschitz)

    def _dictionary_state(self) -> tuple[int, int]:
        return (self.dictionary.data_ptr(), self.dictionary._version)

    def _mark_synced(self) -> None:
        self._synced_with = self._dictionary_state()

    def ensure_step_size(self) -> float:
        """Refresh ``L`` if the dictionary was replaced or changed in place since it was computed (or loaded).

        ``encode`` calls this, so a stale step can never make FISTA diverge; call it before tracing or saving.
        """
        if not is_exporting() and self._synced_with != self._dictionary_state():
            self.update_step_size()
        return float(self.lipschitz)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "lipschitz" in state_dict:  # a saved L belongs to the saved dictionary
            self._mark_synced()

    def __deepcopy__(self, memo):
        """A copy keeps the step size's sync: the copied ``L`` belongs to the copied dictionary."""
        synced = self._synced_with == self._dictionary_state()
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__dict__.update({k: copy.deepcopy(v, memo) for k, v in self.__dict__.items()})
        if synced:
            new._mark_synced()
        return new

    def _apply(self, fn, recurse=True):
        synced = self._synced_with == self._dictionary_state()
        super()._apply(fn, recurse)
        if synced:  # moving or casting keeps the values, so L still holds
            self._mark_synced()
        return self

    # ----------------------------------------------------------------------------- the linear operators
    def _analysis(self, x: torch.Tensor, weight: torch.Tensor, padding_mode: str | None = None) -> torch.Tensor:
        """``D^T x``: (B, C, H, W) -> (B, K, H/s, W/s), with the layer's boundary unless ``padding_mode`` is given."""
        p = self.padding
        if (padding_mode or self.padding_mode) == "zeros":
            return F.conv2d(x, weight, stride=self.stride, padding=p)
        return F.conv2d(F.pad(x, (p, p, p, p), mode="circular"), weight, stride=self.stride)

    def _synthesis(self, z: torch.Tensor, weight: torch.Tensor, padding_mode: str | None = None) -> torch.Tensor:
        """``D z``: (B, K, H/s, W/s) -> (B, C, H, W), the exact adjoint of ``_analysis``."""
        p, s = self.padding, self.stride
        if (padding_mode or self.padding_mode) == "zeros":
            return F.conv_transpose2d(z, weight, stride=s, padding=p, output_padding=s - 1)
        y = F.conv_transpose2d(z, weight, stride=s, output_padding=s - 1)  # (B, C, H + 2p, W + 2p)
        return _fold_circular(_fold_circular(y, p, 2), p, 3)

    def _gram(self, z: torch.Tensor, weight: torch.Tensor, padding_mode: str) -> torch.Tensor:
        return self._analysis(self._synthesis(z, weight, padding_mode), weight, padding_mode)

    def analysis(self, x: torch.Tensor) -> torch.Tensor:
        """The adjoint of ``decode``: ``D^T x``, (B, C, H, W) -> (B, K, H/s, W/s)."""
        self._check_image(x)
        return self._analysis(x, self.dictionary)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Synthesis ``D z``: (B, K, H/s, W/s) -> (B, C, H, W)."""
        return self._synthesis(codes, self.dictionary)

    def synthesize(self, codes: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Synthesis with an explicit dictionary ``weight`` (training holds one side of the game fixed)."""
        return self._synthesis(codes, weight)

    # ----------------------------------------------------------------------------- sparse coding
    def _check_image(self, x: torch.Tensor) -> None:
        if is_exporting():
            return
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % self.stride or w % self.stride:
            raise ValueError(f"height and width must be multiples of the stride {self.stride}, got {h}x{w}")
        if self.padding_mode == "circular" and min(h, w) < 2 * self.padding:
            raise ValueError(f"circular boundary needs images of at least {2 * self.padding} pixels per side")

    @torch.no_grad()
    def clamp_lmbda_weights(self) -> None:
        """Project the penalty weights onto ``w >= 0``, learned threshold scales onto ``>= 0`` and learned step
        scales onto ``[0, MAX_STEP_SCALE]`` (after an optimizer step): beyond a step of ``2 / L`` a gradient
        step amplifies the top eigenvector of ``D^T D`` instead of shrinking it."""
        self.lmbda_weights.clamp_(min=0.0)
        if self.learned_steps:  # the slopes of noise-affine thresholds may take either sign
            self.step_scales.clamp_(0.0, MAX_STEP_SCALE)
            self.threshold_scales.clamp_(min=0.0)

    @torch.no_grad()
    def rebalance_thresholds(self) -> float:
        """Rescale the learned threshold factors to mean 1 and move their scale into ``lmbda``: every threshold
        ``eta_k lmbda w_j tau_k`` stays as it is (exactly, up to float rounding), while the parameters that
        training updates keep magnitudes of order 1, where an optimizer's step means the same to all of them.
        Returns the new ``lmbda`` (the caller records it in the stage's config)."""
        factor = 1.0
        w = float(self.lmbda_weights.mean())
        if w > 0:
            self.lmbda_weights.div_(w)
            factor *= w
        if self.learned_steps:
            tau = float(self.threshold_scales.mean())
            if tau > 0:
                self.threshold_scales.div_(tau)
                if self.noise_adaptive:
                    self.threshold_slopes.div_(tau)
                factor *= tau
        self.lmbda *= factor
        return self.lmbda

    def threshold_parameters(self) -> list[nn.Parameter]:
        """The learned parameters of the thresholds and steps: ``lmbda_weights``, then whichever of ``step_scales``,
        ``threshold_scales``, ``threshold_slopes`` (noise-affine) and ``threshold_exponents`` (neighbourhood) the
        layer has."""
        names = ("step_scales", "threshold_scales", "threshold_slopes", "threshold_exponents")
        return [self.lmbda_weights] + [getattr(self, name) for name in names if hasattr(self, name)]

    def threshold(self, x: torch.Tensor, lmbda_scale: torch.Tensor | float | None) -> torch.Tensor:
        """Per-sample, per-atom prox threshold ``eta * lmbda * w_k * lmbda_scale``, shape (B, K, 1, 1)."""
        base = (self.step_size * self.lmbda * self.lmbda_weights).to(x.dtype).view(1, -1, 1, 1)  # (1, K, 1, 1)
        if lmbda_scale is None:
            return base.expand(x.shape[0], -1, 1, 1)
        return base * self._sample_scale(x, lmbda_scale)

    @staticmethod
    def _sample_scale(x: torch.Tensor, lmbda_scale: torch.Tensor | float, name: str = "lmbda_scale") -> torch.Tensor:
        """``lmbda_scale`` (or another per-sample value, ``name``) as one value per sample, shape (B, 1, 1, 1)."""
        scale = torch.as_tensor(lmbda_scale, dtype=x.dtype, device=x.device)
        if not is_exporting() and (scale.dim() > 1 or (scale.dim() == 1 and scale.shape[0] not in (1, x.shape[0]))):
            raise ValueError(f"{name} must be a scalar or have shape ({x.shape[0]},), got {tuple(scale.shape)}")
        return scale.expand(x.shape[0]).reshape(-1, 1, 1, 1)

    def _lasso(self, detach: bool = False, noise: torch.Tensor | None = None) -> ConvLasso:
        """This layer's operators and settings, as the FISTA forms take them (the step size as it is now);
        ``detach``: the learned step and threshold scales without their gradients; ``noise``: the noise std of
        every sample, (B,) (noise-affine thresholds)."""
        scales = (self.step_scales, self.threshold_scales) if self.learned_steps else (None, None)
        slopes = self.threshold_slopes if self.noise_adaptive else None
        exponents = self.threshold_exponents if self.neighbourhood else None
        if detach and self.learned_steps:
            scales = tuple(t.detach() for t in scales)
            slopes = None if slopes is None else slopes.detach()
            exponents = None if exponents is None else exponents.detach()
        return ConvLasso(
            analysis=self._analysis,
            synthesis=self._synthesis,
            step_size=self.step_size,
            momentum=self.momentum,
            num_atoms=self.num_atoms,
            mu=self.mu,
            nonnegative=self.nonnegative,
            pointwise=self.kernel_size == 1 and self.stride == 1,
            step_scales=scales[0],
            threshold_scales=scales[1],
            threshold_slopes=slopes,
            noise=noise if slopes is not None else None,
            threshold_exponents=exponents,
            neighbourhood=self.neighbourhood,
        )

    def encode(self, x: torch.Tensor, lmbda_scale: torch.Tensor | float | None = None,
               form: str | None = None, noise: torch.Tensor | float | None = None) -> torch.Tensor:
        """Sparse codes of ``x`` after ``num_steps`` FISTA steps: (B, C, H, W) -> (B, K, H/s, W/s), in the FISTA
        form ``form`` (default ``current_form()``; see ``csc_serve.models.fista``). ``noise``: the noise std of
        each sample on the scale of the values of ``x`` (a scalar or (B,); ``None``: 0), which only
        noise-affine thresholds read."""
        form = resolve_form(form)
        self._check_image(x)
        if not is_exporting():
            self.ensure_step_size()
        if self.thresholds == "shared" and rescaled_form_applies(x, self.lmbda_weights, form):
            scale = None if lmbda_scale is None else self._sample_scale(x, lmbda_scale)  # (B, 1, 1, 1)
            return rescaled_form(x, self.dictionary, self.lmbda_weights, self.lmbda, scale, self._lasso())
        return self.fista(x, self.dictionary, self.threshold(x, lmbda_scale), form, noise=noise)

    def fista(self, x: torch.Tensor, weight: torch.Tensor, thresh: torch.Tensor,
              form: str | None = None, detach_steps: bool = False,
              noise: torch.Tensor | float | None = None) -> torch.Tensor:
        """The unrolled solver for an explicit dictionary ``weight`` and threshold ``thresh`` (B, K, 1, 1): the
        training form for ``form`` (default ``current_form()``) ``"training"``, else the folded form.
        ``detach_steps``: learned step and threshold scales enter without their gradients. ``noise``: as for
        ``encode``."""
        if self.noise_adaptive and noise is not None:
            noise = self._sample_scale(x, noise, "noise").view(-1)  # (B,)
        return solve(x, weight, thresh, self._lasso(detach_steps, noise), form)

    def objective(self, x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """``0.5 ||x - D z||^2 + lmbda sum_k w_k ||z_k||_1 + mu/2 ||z||^2`` per sample, shape (B,)."""
        residual = (x - self.decode(codes)).flatten(1)
        l1 = (codes.abs().sum((2, 3)) * self.lmbda_weights).sum(1)  # (B,)
        ridge = codes.flatten(1).pow(2).sum(1)
        return 0.5 * residual.pow(2).sum(1) + self.lmbda * l1 + 0.5 * self.mu * ridge

    def forward(self, x: torch.Tensor, lmbda_scale: torch.Tensor | float | None = None) -> torch.Tensor:
        return self.encode(x, lmbda_scale)
