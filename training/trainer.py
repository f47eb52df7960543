r"""The closed-loop (CTRL) training of a CSC autoencoder, with robust (noisy-input) training.

Notation: ``f_D`` is the multi-stage CSC encoder (unrolled FISTA over the dictionaries ``D``), ``g_D`` the
synthesis through the same dictionaries, ``s(sigma)`` the learned threshold scale for noise level
``sigma`` (a piecewise-linear map with knots ``phi``, ``s(0) = 1``), ``w`` the per-atom weights of every
stage's l1 penalty (``CSCLayer.lmbda_weights``), and ``feat`` maps codes to unit-norm feature vectors. For a
batch of clean crops ``x`` and noise levels ``sigma`` (a ``clean_fraction`` of them 0, the rest uniform on
``[0, sigma_max]``, on the 0..255 scale):

    x~ = x + sigma/255 * n,   Z = f_D(x~, s(sigma)),   X^ = g_D(Z),   Z^ = f_D(X^, 1)

The dictionaries are shared, so the two players of the CTRL maximin game act on the same ``D`` through
different paths; ``sg`` marks a stop-gradient:

    encoder player (max: D through f, w, phi):    maximise  R(Z) + Delta R(Z, f_D(sg X^, 1))
    decoder player (min: D through g):            minimise  Delta R(sg Z, f_sg(D)(g_D(sg Z), 1))

where ``R(Z) = 1/2 logdet(I + d/(n eps^2) Z^T Z)`` is the coding rate of the batch features and
``Delta R(Z, Z^) = R(Z u Z^) - (R(Z) + R(Z^)) / 2`` the binary (real vs. reconstructed) rate reduction
(``csc_serve.training.losses``; features are the unit-normalised last-stage codes of the first ``rate_batch``
crops). The encoder expands the real features and separates them from their re-encoded reconstructions;
the decoder makes the reconstructions indistinguishable in feature space. Both add the pixel term
``w_pix * P(X^, x)`` with ``P = mean_i log(||X^_i - x_i||^2 / N)`` (N values per image) (clean targets, noisy
inputs: robust training; the log gives every noise level the same weight). Each iteration is one move of
the game; by default both players move at once (simultaneous gradient play, one Adam step on)

    L = w_pix * P(g_D(f_D(x~)), x)  -  w_rate * (R(Z) + Delta R(Z, f_D(sg X^)))
                                        +  w_rate * Delta R(sg Z, f_sg(D)(g_D(sg Z)))

With ``alternate`` the players move in turn, each with its own Adam state: first
``L_f = w_pix P(g_sg(D)(Z), x) - w_rate (R(Z) + Delta R(Z, f_D(sg X^)))``, then
``L_g = w_pix P(g_D(sg Z), x) + w_rate Delta R(sg Z, f_sg(D)(g_D(sg Z)))``. The f-path and g-path
pixel gradients add up to the gradient of ``P``; normalised separately by two Adam states they no longer
do, so alternation needs a smaller learning rate and is not the default.
A shift-averaged model (``CSCConfig.shift_average``) serves the mean of the reconstructions of the image at
every shift of its stride grid. With ``train_shifts = n > 1`` the pixel term trains that mean: each step
encodes the batch at ``n`` shifts drawn from the ``S^2`` (without replacement, from the seed and the step) and
``X^`` is the mean of their reconstructions, shifted back; ``Z`` are the codes of the first drawn shift.
With ``w_rate = 0`` the game reduces to supervised denoising of ``x~`` towards ``x``. After every
update the atoms are projected to unit norm, the weights ``w`` onto ``w >= 0``, and a warm-started power
iteration refreshes the FISTA step size. Every ``rollback_every`` steps a fixed noisy held-out batch is probed;
a probe that got worse by more than ``rollback_tolerance`` returns training to the last good state with halved
learning rates (``csc_serve.training.rollback``). After the last step, ``recon_psnr > 0`` moves the reconstruction
setting: with ``c`` the largest scale whose held-out reconstruction PSNR stays at ``recon_psnr``, ``lmbda <- c lmbda``
and ``s(sigma) <- s(sigma) / c`` for ``sigma > 0``, so ``s(0) = 1`` is the sparsest reconstruction that meets the
target and every denoising threshold ``lmbda w s(sigma)`` at the knots is unchanged (the calibration's line search
runs after this move). With several processes (``torchrun``), gradients are averaged before every update.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from csc_serve.models import CSCAutoencoder, psnr
from csc_serve.models.autoencoder import shifted_copies, sum_of_unshifted
from csc_serve.models.calibration import interpolate_scale

from .device import check_device_name, full_precision, resolve_device
from .loader import StepBatch, StepBatches, default_workers
from .losses import binary_rate_reduction, coding_rate, flatten_features
from .rollback import DivergenceGuard


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Every field is recorded in the model's provenance and in checkpoints."""

    data: str
    out: str
    crop_size: int = 48
    batch_size: int = 16
    iterations: int = 400
    lr: float = 2e-4
    lr_calibration: float = 2e-2
    lr_thresholds: float = 1e-2
    lr_final: float = 0.05
    seed: int = 0
    holdout_fraction: float = 0.1
    sigma_max: float = 55.0
    clean_fraction: float = 0.25
    calibration_knots: int = 8
    pixel_weight: float = 1.0
    rate_weight: float = 1e-5
    rate_batch: int = 8
    eps: float = 0.5
    power_iters: int = 5
    checkpoint_every: int = 100
    eval_every: int = 100
    eval_images: int = 8
    alternate: bool = False
    figures: bool = True
    recon_psnr: float = 0.0
    device: str = "auto"
    bf16: bool = False
    workers: int = default_workers()
    checkpoint_minutes: float = 0.0
    train_shifts: int = 1
    rollback_every: int = 50
    rollback_tolerance: float = 0.25

    def __post_init__(self) -> None:
        positive = (
            "crop_size", "batch_size", "rate_batch", "iterations", "checkpoint_every", "eval_every", "power_iters",
            "train_shifts",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.holdout_fraction < 1 or not 0 <= self.clean_fraction <= 1:
            raise ValueError("holdout_fraction must be in [0, 1) and clean_fraction in [0, 1]")
        if not 0 < self.lr_final <= 1:
            raise ValueError(f"lr_final must be in (0, 1], got {self.lr_final}")
        if self.lr_thresholds < 0 or self.lr_calibration < 0:
            raise ValueError("lr_thresholds and lr_calibration must be >= 0")
        if not 0 <= self.recon_psnr < 100:
            raise ValueError(f"recon_psnr must be in [0, 100) dB, got {self.recon_psnr}")
        if self.sigma_max < 0 or min(self.lr, self.eps, self.rollback_tolerance) <= 0 or self.calibration_knots < 2:
            raise ValueError("sigma_max must be >= 0, lr, eps and rollback_tolerance > 0, calibration_knots >= 2")
        if self.workers < 0 or self.checkpoint_minutes < 0 or self.rollback_every < 0:
            raise ValueError("workers, checkpoint_minutes and rollback_every must be >= 0")
        check_device_name(self.device)


def orthonormal_atoms(channels: int, kernel_size: int) -> torch.Tensor:
    """An orthonormal basis of ``channels x k x k`` patches: a colour transform times the 2-D DCT-II.

    Three channels use the opponent colour basis (luminance, red-blue, green-magenta), others the identity.
    Used as a stride-1 convolutional dictionary, these ``C k^2`` atoms form a tight frame
    (``D D^T = k^2 I``): FISTA reconstructs exactly from its first step and converges fast.
    """
    k = kernel_size
    n = torch.arange(k, dtype=torch.float64)
    dct = torch.cos(math.pi * (2 * n[None] + 1) * n[:, None] / (2 * k)) * math.sqrt(2 / k)  # (k, k) rows
    dct[0] /= math.sqrt(2)
    if channels == 3:
        colour = torch.tensor([[1, 1, 1], [1, 0, -1], [1, -2, 1]], dtype=torch.float64)
        colour = colour / colour.norm(dim=1, keepdim=True)
    else:
        colour = torch.eye(channels, dtype=torch.float64)
    # atom (c, i, j)[ch, y, x] = colour[c, ch] * dct[i, y] * dct[j, x]
    atoms = torch.einsum("ca,iy,jx->cijayx", colour, dct, dct)
    return atoms.reshape(channels * k * k, channels, k, k).float()


@torch.no_grad()
def init_dictionaries(model: CSCAutoencoder) -> None:
    """A starting point for training: a stage with at least ``C k^2`` atoms starts from the orthonormal basis
    of ``orthonormal_atoms`` (a tight frame at stride 1; extra atoms keep their random start), a first stage
    with fewer from the first ``num_atoms`` of that basis (all luminance atoms, then the colour ones), and
    any other stage from its random start.
    """
    for index, stage in enumerate(model.stages):
        k, c = stage.kernel_size, stage.in_channels
        if stage.num_atoms >= c * k * k or index == 0:
            n = min(stage.num_atoms, c * k * k)
            stage.dictionary[:n] = orthonormal_atoms(c, k)[:n]
    model.normalize_dictionaries()
    model.update_step_sizes()


def pixel_loss(estimate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over images of ``log MSE_i`` (PSNR up to sign and scale): every noise level weighs the same.

    A plain batch MSE would be dominated by the noisiest crops and trade away clean reconstruction.
    """
    mse = (estimate - target).pow(2).flatten(1).mean(1)  # (B,)
    return mse.clamp_min(1e-10).log().mean()


def encode_with(model: CSCAutoencoder, x: torch.Tensor, scale: torch.Tensor, frozen: bool,
                sigma: torch.Tensor | None = None) -> torch.Tensor:
    """``f(x)`` with the dictionaries detached when ``frozen`` (x is a multiple of the total stride); ``sigma``
    (B,), the noise level of each crop on the 0..255 scale, reaches noise-affine thresholds (``None``: 0)."""
    z, noise = x - model.input_mean, model.noise_std(sigma)
    for stage in model.stages:
        weight = stage.dictionary.detach() if frozen else stage.dictionary
        thresh = stage.threshold(z, scale)  # (B, K, 1, 1): per-atom weights times the per-sample scale
        z = stage.fista(z, weight, thresh.detach() if frozen else thresh, detach_steps=frozen, noise=noise)
    return z


def decode_with(model: CSCAutoencoder, codes: torch.Tensor, frozen: bool) -> torch.Tensor:
    """``g(z)`` with the dictionaries detached when ``frozen``."""
    for stage in reversed(model.stages):
        codes = stage.synthesize(codes, stage.dictionary.detach() if frozen else stage.dictionary)
    return codes + model.input_mean


class Calibration(torch.nn.Module):
    """Learned ``lmbda_scale(sigma)``: log-scales at evenly spaced knots on ``[0, sigma_max]``, ``s(0) = 1``."""

    def __init__(self, sigma_max: float, num_knots: int, initial: tuple[tuple[float, float], ...] | None = None):
        super().__init__()
        top = max(sigma_max, 1.0)
        self.register_buffer("knot_sigma", torch.linspace(0.0, top, num_knots, dtype=torch.float64).float())
        # A first guess: the threshold grows with the noise std (s = 1 + sigma / 10).
        start = 1.0 + self.knot_sigma / 10.0
        if initial is not None:
            ks, kv = torch.tensor(initial, dtype=torch.float64).unbind(1)
            start = interpolate_scale(self.knot_sigma.double(), ks, kv).float()
        self.log_scale = torch.nn.Parameter(start[1:].log())

    def knot_scale(self) -> torch.Tensor:
        return torch.cat([self.log_scale.new_ones(1), self.log_scale.exp()])

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        return interpolate_scale(sigma, self.knot_sigma, self.knot_scale())

    def knots(self) -> tuple[tuple[float, float], ...]:
        return tuple(zip(self.knot_sigma.tolist(), self.knot_scale().detach().tolist()))


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Average the gradients over the processes: all of them flattened into one buffer, one all_reduce."""
    rank, world = _world()
    if world == 1:
        return
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])  # (sum of numel,)
    dist.all_reduce(flat)
    flat /= world
    for p, chunk in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = chunk.view_as(p)


class Trainer:
    """Runs ``TrainConfig`` on a model; ``run()`` trains, checkpoints, evaluates and writes the final model."""

    def __init__(self, model: CSCAutoencoder, config: TrainConfig, train_set, holdout: torch.Tensor | None):
        self.model, self.config = model, config
        self.train_set, self.holdout = train_set, holdout
        self.rank, self.world = _world()
        self.device = resolve_device(config.device)
        model.to(self.device)  # before the optimizers: their state lives beside the parameters
        self.calibration = Calibration(config.sigma_max, config.calibration_knots, model.config.noise_calibration)
        self.calibration.to(self.device)
        self.batches = StepBatches(train_set, config.batch_size, config.sigma_max, config.clean_fraction,
                                   config.seed, self.rank)
        dictionaries = [s.dictionary for s in model.stages]
        groups = [
            {"params": dictionaries},
            {"params": [p for s in model.stages for p in s.threshold_parameters()], "lr": config.lr_thresholds},
            {"params": self.calibration.parameters(), "lr": config.lr_calibration},
        ]
        if config.alternate:
            # One optimizer per player: each keeps its own moment estimates of the shared dictionaries.
            self.optimizers = {
                "encoder": torch.optim.Adam(groups, lr=config.lr),
                "decoder": torch.optim.Adam(dictionaries, lr=config.lr),
            }
        else:
            self.optimizers = {"game": torch.optim.Adam(groups, lr=config.lr)}
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.out = Path(config.out)
        self.prior_seconds = 0.0  # training time of earlier runs of a resumed training
        self._clock = time.monotonic()
        self.lr_factor = 1.0  # halved by every roll-back (csc_serve.training.rollback)
        self.guard = DivergenceGuard(self, config.rollback_every, config.rollback_tolerance, config.seed)

    def start_clock(self) -> None:
        self._clock = time.monotonic()

    def seconds(self) -> float:
        """Seconds of training so far, earlier runs of a resumed training included."""
        return self.prior_seconds + time.monotonic() - self._clock

    # ----------------------------------------------------------------------------- one iteration
    def _batch(self, step: int, batch: StepBatch | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Clean crops, noise levels and noisy crops of ``step`` on the device: ``batch`` as a loader built it
        (``csc_serve.training.loader``), or built here when None."""
        batch = self.batches[step] if batch is None else batch
        if batch.step != step:
            raise ValueError(f"the batch of step {batch.step} was given for step {step}")
        _, clean, sigma, noisy = batch.to(self.device)
        return clean, sigma, noisy

    def _update(self, player: str, loss: torch.Tensor) -> None:
        optimizer = self.optimizers[player]
        optimizer.zero_grad(set_to_none=True)
        with full_precision(self.device.type):  # under --bf16 too: float32 gradients, Adam and power iteration
            loss.backward()
            _average_gradients([p for group in optimizer.param_groups for p in group["params"]])
            optimizer.step()
            self.model.normalize_dictionaries()
            self.model.clamp_lmbda_weights()
            self.model.update_step_sizes(num_iters=self.config.power_iters)

    def _set_learning_rates(self, step: int) -> None:
        """Cosine decay to ``lr_final`` times the configured rates at the last step, times ``lr_factor``."""
        cfg = self.config
        progress = min(step / max(cfg.iterations - 1, 1), 1.0)
        factor = cfg.lr_final + (1 - cfg.lr_final) * 0.5 * (1 + math.cos(math.pi * progress))
        factor *= self.lr_factor
        for optimizer in self.optimizers.values():
            for group in optimizer.param_groups:
                group["lr"] = group.setdefault("initial_lr", group["lr"]) * factor

    def _encoder_rates(self, z: torch.Tensor, x_hat: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The max player's rate terms, ``-(R(Z) + Delta R(Z, f(sg X^)))``, with D through f."""
        eps = self.config.eps
        z_hat = encode_with(self.model, x_hat.detach(), torch.ones(len(z)), frozen=False)
        feats, feats_hat = flatten_features(z), flatten_features(z_hat)
        expansion, reduction = coding_rate(feats, eps), binary_rate_reduction(feats, feats_hat, eps)
        return -(expansion + reduction), {"rate": expansion.item(), "delta_rate_f": reduction.item()}

    def _decoder_rates(self, z: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The min player's rate term, ``Delta R(sg Z, f_sg(g(sg Z)))``, with D through g."""
        x_hat = decode_with(self.model, z.detach(), frozen=False)
        z_hat = encode_with(self.model, x_hat, torch.ones(len(z)), frozen=True)
        reduction = binary_rate_reduction(flatten_features(z.detach()), flatten_features(z_hat), self.config.eps)
        return reduction, {"delta_rate_g": reduction.item()}

    @torch.no_grad()
    def pixel_loss_of(self, clean: torch.Tensor, sigma: torch.Tensor, noisy: torch.Tensor) -> float:
        """A training step's pixel loss ``P`` on ``noisy`` crops (noise ``sigma``), one shift, no gradients."""
        model = self.model
        codes = encode_with(model, model._pad(noisy), self.calibration(sigma), frozen=True, sigma=sigma)
        out = decode_with(model, codes, frozen=True)[..., : clean.shape[-2], : clean.shape[-1]]
        return float(pixel_loss(out, clean))

    def _shifts(self, step: int) -> list[tuple[int, int]]:
        """The grid shifts averaged in step ``step`` (``train_shifts`` of them), or ``[]`` for the image as it is."""
        grid = self.model.config.shifts
        count = min(self.config.train_shifts, len(grid))
        if count < 2:
            return []
        generator = torch.Generator().manual_seed(self.config.seed * 7_919 + step)
        return [grid[int(i)] for i in torch.randperm(len(grid), generator=generator)[:count]]

    def _first_shift(self, images: torch.Tensor, shifts: list[tuple[int, int]]) -> torch.Tensor:
        """``images`` as the first drawn shift encodes them, so that their codes line up with ``Z``."""
        return images if not shifts else shifted_copies(images, shifts[:1], self.model.config.total_stride)

    @staticmethod
    def _merge(out: torch.Tensor, shifts: list[tuple[int, int]], x: torch.Tensor) -> torch.Tensor:
        """The mean of the reconstructions of the shifted copies, shifted back: ``X^`` at the size of ``x``."""
        return out if not shifts else sum_of_unshifted(out, shifts, tuple(x.shape[-2:])) / len(shifts)

    def train_step(self, step: int, batch: StepBatch | None = None) -> dict[str, float]:
        cfg, model = self.config, self.model
        self._set_learning_rates(step)
        x, sigma, noisy = self._batch(step, batch)  # (B, C, S, S), (B,), (B, C, S, S)
        rates = cfg.rate_weight > 0
        nr = min(cfg.rate_batch, x.shape[0])  # the rate terms use the first rate_batch samples of the batch
        metrics: dict[str, float] = {}

        shifts = self._shifts(step)
        scale = self.calibration(sigma)
        if shifts:
            noisy = shifted_copies(noisy, shifts, model.config.total_stride)
            scale, sigma = scale.repeat(len(shifts)), sigma.repeat(len(shifts))
        z = encode_with(model, noisy, scale, frozen=False, sigma=sigma)  # shifted: the copies, shift by shift
        if not cfg.alternate:
            # Both players move at once: the pixel term through f and g, each player's rate terms.
            x_hat = self._merge(decode_with(model, z, frozen=False), shifts, x)
            pixel = F.mse_loss(x_hat, x)
            loss = cfg.pixel_weight * pixel_loss(x_hat, x)
            if rates:
                up, m_f = self._encoder_rates(z[:nr], self._first_shift(x_hat[:nr], shifts))
                down, m_g = self._decoder_rates(z[:nr])
                loss = loss + cfg.rate_weight * (up + down)
                metrics.update(m_f | m_g)
            self._update("game", loss)
        else:
            # Encoder step: D through f (and the calibration), the synthesis fixed.
            x_hat = self._merge(decode_with(model, z, frozen=True), shifts, x)
            pixel = F.mse_loss(x_hat, x)
            loss_f = cfg.pixel_weight * pixel_loss(x_hat, x)
            if rates:
                up, m_f = self._encoder_rates(z[:nr], self._first_shift(x_hat[:nr], shifts))
                loss_f = loss_f + cfg.rate_weight * up
                metrics.update(m_f)
            self._update("encoder", loss_f)
            # Decoder step: D through g, the codes and the re-encoding's analysis fixed.
            x_hat = self._merge(decode_with(model, z.detach(), frozen=False), shifts, x)
            loss_g = cfg.pixel_weight * pixel_loss(x_hat, x)
            if rates:
                down, m_g = self._decoder_rates(z[:nr])
                loss_g = loss_g + cfg.rate_weight * down
                metrics.update(m_g)
            self._update("decoder", loss_g)
        metrics["pixel_mse"] = pixel.item()
        metrics["zero_fraction"] = (z == 0).float().mean().item()
        metrics["train_psnr"] = psnr(x_hat.detach(), x, clip=True, per_image=True).mean().item()
        return metrics
