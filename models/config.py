"""The architecture of a CSC-CTRL model, saved beside its weights as ``config.json``."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

PADDING_MODES = ("zeros", "circular")
SHIFT_PATTERNS = ("grid", "quincunx")
THRESHOLD_MODES = ("shared", "per_atom", "noise_affine")


class ConfigError(ValueError):
    """A configuration that does not describe a valid model."""


def _reject_unknown(cls: type, data: dict[str, Any], where: str) -> None:
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_calibration(knots: Any) -> tuple[tuple[float, float], ...]:
    try:
        pairs = tuple((float(sigma), float(scale)) for sigma, scale in knots)
    except (TypeError, ValueError):
        raise ConfigError("noise_calibration must be a list of [sigma, lmbda_scale] pairs") from None
    sigmas = [p[0] for p in pairs]
    if len(pairs) < 2 or sigmas[0] != 0 or any(b <= a for a, b in zip(sigmas, sigmas[1:])):
        raise ConfigError("noise_calibration needs two or more knots with sigma strictly increasing from 0")
    if not all(math.isfinite(v) for p in pairs for v in p) or min(p[1] for p in pairs) <= 0:
        raise ConfigError("noise_calibration values must be finite and every lmbda_scale positive")
    return pairs


def _check_float(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class StageConfig:
    """One encoder stage: a dictionary of ``num_atoms`` atoms and its FISTA solve. ``learned_steps``: every
    FISTA step has a learned step size and threshold scale (``CSCLayer``); off, plain FISTA. ``thresholds``
    (with learned steps): ``"shared"``, one threshold scale per step for every atom; ``"per_atom"``, one per
    step and atom; ``"noise_affine"``, per step and atom and affine in the noise level of the input
    (``csc_serve.models.fista``). ``neighbourhood`` ``n`` (odd, with per-atom thresholds; 0: off) scales the
    threshold of every code by the energy of its ``n x n`` neighbourhood on the code grid, with a learned
    exponent per step and atom: a reweighted l1 step (``csc_serve.models.fista``)."""

    num_atoms: int
    kernel_size: int
    stride: int = 1
    lmbda: float = 0.1
    num_steps: int = 2
    mu: float = 0.0
    learned_steps: bool = False
    thresholds: str = "shared"
    neighbourhood: int = 0

    def __post_init__(self) -> None:
        _check_int("num_atoms", self.num_atoms, 1)
        _check_int("kernel_size", self.kernel_size, 1)
        _check_int("stride", self.stride, 1)
        _check_int("num_steps", self.num_steps, 1)
        if self.kernel_size % 2 == 0:
            raise ConfigError(f"kernel_size must be odd, got {self.kernel_size}")
        if self.stride > self.kernel_size:
            raise ConfigError(f"stride {self.stride} is larger than kernel_size {self.kernel_size}")
        _check_float("lmbda", self.lmbda)
        _check_float("mu", self.mu)
        if not isinstance(self.learned_steps, bool):
            raise ConfigError(f"learned_steps must be true or false, got {self.learned_steps!r}")
        if self.thresholds not in THRESHOLD_MODES:
            raise ConfigError(f"thresholds must be one of {THRESHOLD_MODES}, got {self.thresholds!r}")
        if self.thresholds != "shared" and not self.learned_steps:
            raise ConfigError(f"thresholds {self.thresholds!r} needs learned_steps")
        _check_int("neighbourhood", self.neighbourhood, 0)
        if self.neighbourhood and self.neighbourhood % 2 == 0:
            raise ConfigError(f"neighbourhood must be 0 or odd, got {self.neighbourhood}")
        if self.neighbourhood and self.thresholds == "shared":
            raise ConfigError("neighbourhood needs per-atom thresholds (thresholds 'per_atom' or 'noise_affine')")

    @property
    def noise_adaptive(self) -> bool:
        """Whether the thresholds follow the noise level given with the input (``"noise_affine"``)."""
        return self.thresholds == "noise_affine"


@dataclass(frozen=True)
class CSCConfig:
    """Architecture of a multi-stage CSC autoencoder.

    Stage ``l`` sparse-codes the codes of stage ``l - 1`` (the image for ``l = 0``), so its input channels are
    the previous stage's ``num_atoms``. Images are floats in ``value_range``; ``input_mean`` (one value per
    channel, optional) is subtracted before encoding and added back after decoding. ``noise_calibration``
    (optional) maps a Gaussian noise level to the ``lmbda_scale`` that denoises it best: knots
    ``(sigma, lmbda_scale)`` with sigma on the 0..255 scale, strictly increasing from 0, interpolated linearly.
    ``shift_average`` makes ``reconstruct`` (and ``denoise``) average the reconstructions of the image at
    every shift ``(dy, dx)`` in ``[0, S)^2``, ``S = total_stride`` (cycle spinning): a strided model is not
    translation invariant, and the average removes its grid artefacts (a large gain when denoising). The
    codes returned by ``encode`` are those of the unshifted image. ``shift_step`` ``k`` (a divisor of ``S``,
    default 1) keeps the shifts on a coarser grid, ``(dy, dx)`` in ``{0, k, 2k, ..}^2``: ``(S / k)^2`` copies
    instead of ``S^2``, for ``k^2`` times less reconstruct work and part of the gain (``shifts`` lists them).
    ``shift_pattern`` ``"quincunx"`` keeps half of those, the ones with ``(dy + dx) / k`` even (a checkerboard
    of the grid, which needs ``S / k`` even): half the work of ``"grid"`` (the default, every shift of the grid)
    for nearly all of its gain, since every pixel still sees the grid at shifts at most ``k`` apart.
    ``provenance`` is free-form metadata (data, command, date) kept with the weights.
    """

    in_channels: int = 3
    stages: tuple[StageConfig, ...] = (StageConfig(num_atoms=32, kernel_size=7, stride=1),)
    nonnegative: bool = True
    padding_mode: str = "zeros"
    value_range: tuple[float, float] = (0.0, 1.0)
    input_mean: tuple[float, ...] | None = None
    noise_calibration: tuple[tuple[float, float], ...] | None = None
    shift_average: bool = False
    shift_step: int = 1
    shift_pattern: str = "grid"
    provenance: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        _check_int("in_channels", self.in_channels, 1)
        stages = tuple(s if isinstance(s, StageConfig) else StageConfig(**s) for s in self.stages)
        if not stages:
            raise ConfigError("a model needs at least one stage")
        object.__setattr__(self, "stages", stages)
        if self.padding_mode not in PADDING_MODES:
            raise ConfigError(f"padding_mode must be one of {PADDING_MODES}, got {self.padding_mode!r}")
        if not isinstance(self.nonnegative, bool):
            raise ConfigError(f"nonnegative must be true or false, got {self.nonnegative!r}")
        if not isinstance(self.shift_average, bool):
            raise ConfigError(f"shift_average must be true or false, got {self.shift_average!r}")
        _check_int("shift_step", self.shift_step, 1)
        if self.shift_step > 1 and not (self.shift_average and self.total_stride % self.shift_step == 0):
            raise ConfigError(f"shift_step {self.shift_step} needs shift_average and must divide the total stride "
                              f"{self.total_stride}")
        if self.shift_pattern not in SHIFT_PATTERNS:
            raise ConfigError(f"shift_pattern must be one of {SHIFT_PATTERNS}, got {self.shift_pattern!r}")
        grid_shifts = self.total_stride // self.shift_step  # per axis
        if self.shift_pattern == "quincunx" and not (self.shift_average and grid_shifts % 2 == 0):
            raise ConfigError(f"shift_pattern 'quincunx' needs shift_average and an even number of grid shifts per "
                              f"axis (total stride {self.total_stride} / shift_step {self.shift_step})")
        low, high = (float(v) for v in self.value_range)
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ConfigError(f"value_range must be two finite numbers, low < high, got {self.value_range}")
        object.__setattr__(self, "value_range", (low, high))
        if self.input_mean is not None:
            mean = tuple(float(v) for v in self.input_mean)
            if len(mean) != self.in_channels or not all(map(math.isfinite, mean)):
                raise ConfigError(f"input_mean needs {self.in_channels} finite values, got {self.input_mean}")
            object.__setattr__(self, "input_mean", mean)
        if self.noise_calibration is not None:
            object.__setattr__(self, "noise_calibration", _check_calibration(self.noise_calibration))
        if not isinstance(self.provenance, dict):
            raise ConfigError("provenance must be a mapping")

    @property
    def total_stride(self) -> int:
        """Images are padded to a multiple of this; the last-stage codes are this much smaller."""
        return math.prod(s.stride for s in self.stages)

    @property
    def shifts(self) -> list[tuple[int, int]]:
        """The grid shifts ``(dy, dx)`` that ``reconstruct`` averages: ``[(0, 0)]`` without ``shift_average``."""
        s, k = (self.total_stride if self.shift_average else 1), self.shift_step
        grid = [(dy, dx) for dy in range(0, s, k) for dx in range(0, s, k)]
        if self.shift_pattern == "quincunx":
            return [(dy, dx) for dy, dx in grid if (dy + dx) // k % 2 == 0]
        return grid

    @property
    def noise_adaptive(self) -> bool:
        """Whether any stage's thresholds follow the noise level (its graphs then take ``sigma``)."""
        return any(stage.noise_adaptive for stage in self.stages)

    @property
    def code_channels(self) -> int:
        return self.stages[-1].num_atoms

    def stage_in_channels(self, index: int) -> int:
        return self.in_channels if index == 0 else self.stages[index - 1].num_atoms

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        # learned_steps, thresholds and neighbourhood are written only where set: a plain model's config reads as
        # it always has.
        defaults = {"learned_steps": False, "thresholds": "shared", "neighbourhood": 0}
        out["stages"] = [{k: v for k, v in dataclasses.asdict(s).items() if k not in defaults or v != defaults[k]}
                         for s in self.stages]
        if self.shift_step == 1:  # written only where set, as learned_steps
            del out["shift_step"]
        if self.shift_pattern == "grid":
            del out["shift_pattern"]
        out["value_range"] = list(self.value_range)
        if self.input_mean is not None:
            out["input_mean"] = list(self.input_mean)
        if self.noise_calibration is not None:
            out["noise_calibration"] = [list(knot) for knot in self.noise_calibration]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CSCConfig:
        """Build a config from ``to_dict`` output; unknown or malformed fields raise ``ConfigError``."""
        if not isinstance(data, dict):
            raise ConfigError("the architecture must be a JSON object")
        _reject_unknown(cls, data, "architecture")
        stages = data.get("stages")
        if not isinstance(stages, list) or not all(isinstance(s, dict) for s in stages):
            raise ConfigError("'stages' must be a list of objects")
        for i, stage in enumerate(stages):
            _reject_unknown(StageConfig, stage, f"stage {i}")
        try:
            return cls(**{**data, "stages": tuple(StageConfig(**s) for s in stages)})
        except TypeError as err:  # a required field is missing
            raise ConfigError(str(err)) from None
