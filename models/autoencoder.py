"""The multi-stage CSC-CTRL autoencoder: a cascade of CSC layers and the synthesis back through them."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .calibration import scale_for_sigma
from .config import CSCConfig
from .fista import is_exporting, resolve_form
from .images import pad_to_stride
from .layer import CSCLayer
from .noise import estimate_noise_sigma
from .serialization import check_weights, read_weights, save_pretrained

# Pixels of shifted copies encoded at once by an eager shift-averaged reconstruct.
SHIFT_PASS_PIXELS = 1 << 18


def shifted_copies(x: torch.Tensor, shifts: list[tuple[int, int]], stride: int) -> torch.Tensor:
    """Copies of ``x`` (B, C, H, W) shifted by each ``(dy, dx)`` in ``shifts``, ordered shift by shift, each a
    whole batch: (len(shifts) B, C, H + stride, W + stride). Shifting by ``(dy, dx)`` pads ``dy`` rows on top
    and ``stride - dy`` below (edge replication), so every copy has the same size."""
    return torch.cat([F.pad(x, (dx, stride - dx, dy, stride - dy), mode="replicate") for dy, dx in shifts])


def sum_of_unshifted(out: torch.Tensor, shifts: list[tuple[int, int]], size: tuple[int, int]) -> torch.Tensor:
    """The sum over shifts of the outputs of ``shifted_copies``, each shifted back and cropped to ``size``:
    (len(shifts) B, C, H', W') -> (B, C, H, W)."""
    h, w = size
    out = out.unflatten(0, (len(shifts), -1))  # (shifts, B, C, H', W')
    return torch.stack([out[i, ..., dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(shifts)]).sum(0)


def zero_map(codes: torch.Tensor) -> torch.Tensor:
    """The number of zero codes at each position of ``codes`` (B, K, h, w): (B, h, w) float32 (exact: counts stay
    far below 2^24, while half precision would round them beyond 2048)."""
    return (codes == 0).to(torch.float32).sum(1)


class CSCAutoencoder(nn.Module):
    r"""Multi-stage convolutional sparse coding autoencoder (the encoder and decoder of CSC-CTRL).

    Encoder ``f``: stage ``l`` solves a Lasso over its dictionary ``D_l`` for the codes ``z_{l-1}`` of the
    stage before (``z_0`` is the image less ``input_mean``):

        z_l = FISTA_{num_steps_l}( argmin_z 0.5 ||z_{l-1} - D_l z||^2
                                            + lmbda_l * lmbda_scale * sum_k w_lk ||z_k||_1 )

    with learned per-atom weights ``w_l`` (``CSCLayer.lmbda_weights``).

    Decoder ``g``: the synthesis back through the same dictionaries, ``g(z_L) = D_1 D_2 ... D_L z_L`` (plus
    ``input_mean``). Nothing sits between stages, so ``decode`` inverts exactly what ``encode`` models.

    Images are float tensors ``(B, C, H, W)`` of any size; they are padded (edge replication) to a multiple
    of ``config.total_stride`` and results are cropped back. With ``config.shift_average``, ``reconstruct``
    and ``denoise`` average over the ``S^2`` shifts of the stride grid (cycle spinning). ``lmbda_scale``
    (``None``, a float, or a tensor of shape ``(B,)``) multiplies every stage's threshold per sample; 1.0 is
    the trained sparsity. ``sigma`` (the same forms, on the 0..255 scale; ``None`` is 0) is the noise level of
    each image, which only stages with noise-affine thresholds (``StageConfig.thresholds``) read: their
    thresholds move with it, on top of ``lmbda_scale``; ``denoise`` passes the level it denoises.
    """

    def __init__(self, config: CSCConfig):
        super().__init__()
        self.config = config
        self.stages = nn.ModuleList(
            CSCLayer(
                in_channels=config.stage_in_channels(i),
                num_atoms=stage.num_atoms,
                kernel_size=stage.kernel_size,
                stride=stage.stride,
                lmbda=stage.lmbda,
                num_steps=stage.num_steps,
                padding_mode=config.padding_mode,
                nonnegative=config.nonnegative,
                mu=stage.mu,
                learned_steps=stage.learned_steps,
                thresholds=stage.thresholds,
                neighbourhood=stage.neighbourhood,
            )
            for i, stage in enumerate(config.stages)
        )
        mean = torch.tensor(config.input_mean or [0.0] * config.in_channels).view(1, -1, 1, 1)
        self.register_buffer("input_mean", mean, persistent=False)

    # ----------------------------------------------------------------------------- upkeep
    def normalize_dictionaries(self) -> None:
        """Project every atom onto the unit sphere (after an optimizer step)."""
        for stage in self.stages:
            stage.normalize_dictionary()

    def clamp_lmbda_weights(self) -> None:
        """Keep every stage's per-atom penalty weights non-negative (after an optimizer step)."""
        for stage in self.stages:
            stage.clamp_lmbda_weights()

    def set_lmbdas(self, lmbdas: list[float]) -> None:
        """Give every stage its Lasso weight ``lmbda`` (in the layers and in ``config``)."""
        for stage, lmbda in zip(self.stages, lmbdas):
            stage.lmbda = float(lmbda)
        stages = tuple(dataclasses.replace(s, lmbda=float(v)) for s, v in zip(self.config.stages, lmbdas))
        self.config = dataclasses.replace(self.config, stages=stages)

    def rebalance_thresholds(self) -> None:
        """Every stage's ``CSCLayer.rebalance_thresholds``, the new ``lmbda`` recorded in ``config``: the
        same model, with learned threshold factors of mean 1."""
        self.set_lmbdas([stage.rebalance_thresholds() for stage in self.stages])

    def update_step_sizes(self, num_iters: int | None = None) -> list[float]:
        """Refresh every stage's Lipschitz constant (after the dictionaries changed)."""
        return [stage.update_step_size(num_iters) for stage in self.stages]

    def ensure_step_sizes(self) -> list[float]:
        """Refresh the step sizes of stages whose dictionary changed since they were computed."""
        return [stage.ensure_step_size() for stage in self.stages]

    # ----------------------------------------------------------------------------- shapes
    def _check_images(self, x: torch.Tensor) -> None:
        if not is_exporting():
            c = self.config.in_channels
            if x.dim() != 4 or x.shape[1] != c:
                raise ValueError(f"expected images of shape (B, {c}, H, W), got {tuple(x.shape)}")
            if x.shape[-1] == 0 or x.shape[-2] == 0:
                raise ValueError(f"images must have at least one pixel, got {tuple(x.shape)}")

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        self._check_images(x)
        return pad_to_stride(x, self.config.total_stride)

    # ----------------------------------------------------------------------------- the model
    def noise_std(self, sigma: torch.Tensor | float | None) -> torch.Tensor | float | None:
        """A noise level on the 0..255 scale as a std on the scale of the model's values (``value_range``)."""
        if sigma is None or not self.config.noise_adaptive:
            return None
        low, high = self.config.value_range
        return sigma * ((high - low) / 255.0)

    def encode(
        self,
        x: torch.Tensor,
        lmbda_scale: torch.Tensor | float | None = None,
        all_stages: bool = False,
        form: str | None = None,
        sigma: torch.Tensor | float | None = None,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Last-stage codes ``(B, K_L, ceil(H/S), ceil(W/S))``, or with ``all_stages`` every stage's codes.
        ``form``: the FISTA form (``csc_serve.models.fista``), by default ``current_form()``; ``sigma``: the noise
        level of each image (class docstring)."""
        form = resolve_form(form)  # read once, before any tensor work: see resolve_form
        z = self._pad(x) - self.input_mean.to(x.dtype)
        noise = self.noise_std(sigma)
        codes = []
        for stage in self.stages:
            z = stage.encode(z, lmbda_scale, form, noise)  # (B, K_l, H/s_1.../s_l, W/...)
            codes.append(z)
        return codes if all_stages else z

    def decode(self, codes: torch.Tensor, output_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Images from last-stage codes: ``(B, K_L, h, w) -> (B, C, h*S, w*S)``, cropped to ``output_size``."""
        if not is_exporting():
            k = self.config.code_channels
            if codes.dim() != 4 or codes.shape[1] != k:
                raise ValueError(f"expected codes of shape (B, {k}, h, w), got {tuple(codes.shape)}")
        x = codes
        for stage in reversed(self.stages):
            x = stage.decode(x)
        x = x + self.input_mean.to(x.dtype)
        if output_size is not None:
            x = x[..., : output_size[0], : output_size[1]]
        return x

    def reconstruct(self, x: torch.Tensor, lmbda_scale: torch.Tensor | float | None = None,
                    form: str | None = None, sigma: torch.Tensor | float | None = None) -> torch.Tensor:
        """``decode(encode(x))`` at the size of ``x``; with ``config.shift_average``, its mean over the
        shifts of ``x`` in ``config.shifts`` (all ``S^2``, ``S = total_stride``, unless ``shift_step`` thins
        them): shift by shift when traced (one copy's code maps alive at a time), a few shifts per batch
        (``SHIFT_PASS_PIXELS``) in eager mode. ``form`` and ``sigma`` as for ``encode``."""
        return self.reconstruct_counting(x, lmbda_scale, form, sigma, count=False)[0]

    def reconstruct_counting(self, x: torch.Tensor, lmbda_scale: torch.Tensor | float | None = None,
                             form: str | None = None, sigma: torch.Tensor | float | None = None,
                             count: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``reconstruct``, and where the codes it was made of are zero: ``(B, h, w)`` with ``h x w =
        ceil(H/S) x ceil(W/S)``, at each position of the code grid the number of zero last-stage codes of
        every shifted copy (each copy's first ``h x w`` positions; ``K`` per copy at most), or ``None`` when
        ``count`` is false. Over the sum of the map, ``K * len(config.shifts) * h * w`` (``K`` for a model
        without shift averaging) is the fraction of zero codes the reconstruction used."""
        form = resolve_form(form)
        size = tuple(x.shape[-2:])
        s = self.config.total_stride
        if not self.config.shift_average or s == 1:
            codes = self.encode(x, lmbda_scale, form=form, sigma=sigma)  # (B, K, h, w)
            return self.decode(codes, output_size=size), (zero_map(codes) if count else None)
        self._check_images(x)
        shifts = self.config.shifts
        exporting = is_exporting()

        def per_sample(value, name: str) -> bool:
            many = isinstance(value, torch.Tensor) and value.dim() == 1 and (exporting or value.shape[0] > 1)
            if many and not exporting and value.shape[0] != x.shape[0]:
                raise ValueError(f"{name} must be a scalar or have shape {(x.shape[0],)}, got {tuple(value.shape)}")
            return many

        def repeated(value, many: bool, copies: int):
            return value.repeat(copies) if many else value

        scale_many, sigma_many = per_sample(lmbda_scale, "lmbda_scale"), per_sample(sigma, "sigma")
        h, w = size
        code_h, code_w = -(-h // s), -(-w // s)
        if exporting:
            # One shift after the other: the runtime holds one copy's code maps at a time, not S^2 of them.
            group = 1
        else:
            # Eager: a few shifts at a time, so memory and the working set follow one batch, not S^2 of them.
            group = max(1, SHIFT_PASS_PIXELS // ((h + s) * (w + s) * x.shape[0]))
        total = zeros = None
        for first in range(0, len(shifts), group):
            part = shifts[first : first + group]
            copies = shifted_copies(x, part, s)
            codes = self.encode(copies, repeated(lmbda_scale, scale_many, len(part)), form=form,
                                sigma=repeated(sigma, sigma_many, len(part)))
            crops = sum_of_unshifted(self.decode(codes), part, (h, w))
            total = crops if total is None else total + crops
            if count:
                counts = zero_map(codes[..., :code_h, :code_w]).unflatten(0, (len(part), -1)).sum(0)  # (B, h, w)
                zeros = counts if zeros is None else zeros + counts
        return total / len(shifts), zeros

    def lmbda_scale_for_sigma(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """The calibrated ``lmbda_scale`` for Gaussian noise of std ``sigma`` (0..255 scale), per sample."""
        knots = self.config.noise_calibration
        if knots is None:
            raise ValueError("this model has no noise calibration (train it with noise, or pass lmbda_scale)")
        if isinstance(sigma, torch.Tensor):
            sigma = sigma.detach().cpu().numpy()
        return torch.from_numpy(scale_for_sigma(knots, np.reshape(sigma, -1))).float()

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor | float | None = None) -> torch.Tensor:
        """Remove Gaussian noise of std ``sigma`` (0..255 scale, scalar or (B,)); estimated per image if None."""
        if sigma is None:
            sigma = estimate_noise_sigma(x)
        scale = self.lmbda_scale_for_sigma(sigma).to(x.device)
        scale = scale.expand(x.shape[0]) if scale.numel() == 1 else scale
        return self.reconstruct(x, scale, sigma=torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1)
                                .expand(x.shape[0]))

    def forward(self, x: torch.Tensor, lmbda_scale: torch.Tensor | float | None = None) -> torch.Tensor:
        return self.reconstruct(x, lmbda_scale)

    # ----------------------------------------------------------------------------- persistence
    def save_pretrained(self, directory: str | os.PathLike) -> str:
        """Write ``config.json`` and ``model.safetensors`` into ``directory``; returns the weights' sha256."""
        return save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, map_location: str = "cpu") -> CSCAutoencoder:
        """Load and verify a model directory, or a bundled model by name (``csc-ctrl-rgb``); raises
        ``ModelLoadError`` on any fault (``csc_serve.models.serialization``)."""
        config, tensors, weights = read_weights(name_or_path, map_location)
        model = cls(config)
        check_weights(tensors, model.state_dict(), weights)
        model.load_state_dict(tensors, strict=True)
        model.to(map_location)
        return model.eval()


def load_pretrained(name_or_path: str | os.PathLike, map_location: str = "cpu") -> CSCAutoencoder:
    """Load and verify a model directory (or bundled model name): ``CSCAutoencoder.from_pretrained``."""
    return CSCAutoencoder.from_pretrained(name_or_path, map_location=map_location)
