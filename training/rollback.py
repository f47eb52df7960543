"""Roll-back when training diverges: probe a fixed noisy batch, keep the last good state, return to it.

Every ``every`` steps the trainer measures the pixel loss ``P`` (mean log MSE, ``pixel_loss``) of the model on
a fixed probe: the held-out crops, each with fixed noise at one of ``PROBE_SIGMAS`` (and clean), encoded at
the learned scale for its noise level, one grid shift, as a training step sees them but without gradients.
With ``best`` the lowest probe loss so far:

- ``P <= best + tolerance``: the state is good; it is copied (model, optimizers, noise map, learning-rate
  factor, the warm vectors of the step-size power iteration).
- ``P > best + tolerance`` (or not finite): training diverged since the last good probe. The last good state
  comes back, and every learning rate is halved from then on. The step counter runs on, so the data that
  follows differs from the data that led astray.

A tolerance of 0.25 in log MSE is about 1.1 dB of probe PSNR: well beyond the probe's drift between two
probes of a healthy run, well below what a step that breaks FISTA (a step size past its stable range, an
atom that blows up) costs.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

PROBE_SIGMAS = (0.0, 15.0, 25.0, 50.0)  # noise levels of the probe crops, in turn (0..255)


@dataclass
class Snapshot:
    model: dict
    optimizers: dict
    calibration: dict
    power_vectors: list
    lr_factor: float


class DivergenceGuard:
    """Probes ``trainer`` every ``every`` steps and rolls it back as the module docstring says."""

    def __init__(self, trainer, every: int, tolerance: float, seed: int = 0):
        self.trainer, self.every, self.tolerance = trainer, every, tolerance
        self.best = math.inf
        self.rollbacks = 0
        self.snapshot: Snapshot | None = None
        self.probe = self._probe_batch(trainer.holdout, seed) if every > 0 and trainer.holdout else None

    @property
    def active(self) -> bool:
        return self.probe is not None

    @staticmethod
    def _probe_batch(holdout: list[torch.Tensor], seed: int):
        clean = torch.stack(list(holdout))  # (N, C, S, S): the held-out centre crops
        sigma = torch.tensor([PROBE_SIGMAS[i % len(PROBE_SIGMAS)] for i in range(len(clean))], device=clean.device)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + 17)
        noise = torch.randn(clean.shape, generator=gen).to(clean.device)
        return clean, sigma, clean + sigma.view(-1, 1, 1, 1) / 255.0 * noise

    def probe_loss(self) -> float:
        return self.trainer.pixel_loss_of(*self.probe)

    def after_step(self, step: int) -> dict[str, float]:
        """Probe at every ``every``-th step: keep the state, or roll back. Returns what it measured."""
        if not self.active or step % self.every:
            return {}
        loss = self.probe_loss()
        if math.isfinite(loss) and loss <= self.best + self.tolerance:
            self.best = min(self.best, loss)
            self.snapshot = self._take()
            return {"probe_loss": loss}
        if self.snapshot is None:  # nothing good to return to yet
            return {"probe_loss": loss}
        self._restore(self.snapshot)
        self.trainer.lr_factor = self.snapshot.lr_factor = self.snapshot.lr_factor * 0.5
        self.rollbacks += 1
        return {"probe_loss": loss, "rolled_back": 1.0}

    def _take(self) -> Snapshot:
        trainer = self.trainer
        return Snapshot(
            model=copy.deepcopy(trainer.model.state_dict()),
            optimizers={name: copy.deepcopy(opt.state_dict()) for name, opt in trainer.optimizers.items()},
            calibration=copy.deepcopy(trainer.calibration.state_dict()),
            power_vectors=[stage._power_vector.clone() for stage in trainer.model.stages],
            lr_factor=trainer.lr_factor,
        )

    def _restore(self, snapshot: Snapshot) -> None:
        trainer = self.trainer
        trainer.model.load_state_dict(snapshot.model)
        for name, opt in trainer.optimizers.items():
            opt.load_state_dict(copy.deepcopy(snapshot.optimizers[name]))
        trainer.calibration.load_state_dict(snapshot.calibration)
        for stage, vector in zip(trainer.model.stages, snapshot.power_vectors):
            stage._power_vector = vector.clone()
        trainer.lr_factor = snapshot.lr_factor
