"""Named starting architectures for ``csc train --preset NAME``."""

from __future__ import annotations

from csc_serve.models import CSCConfig, StageConfig

PRESETS: dict[str, CSCConfig] = {
    # The architecture of the bundled default model, csc-ctrl-rgb (models/pretrained/README.md: how it was
    # trained and measured), and what `csc train` builds without --preset: 256 colour atoms of 9x9 on a stride-4
    # grid with 4 learned FISTA steps, then 128 1x1 atoms over their codes with 8, every step with a learned
    # step size and a learned threshold per atom, affine in the noise level, the second stage's thresholds also
    # set per position by the 3x3 codes around each code; reconstruct and denoise average 8 of the 16 shifts of
    # the grid (quincunx).
    "csc-ctrl-rgb": CSCConfig(
        in_channels=3,
        stages=(
            StageConfig(num_atoms=256, kernel_size=9, stride=4, lmbda=0.01, num_steps=4, learned_steps=True,
                        thresholds="noise_affine"),
            StageConfig(num_atoms=128, kernel_size=1, stride=1, lmbda=0.01, num_steps=8, learned_steps=True,
                        thresholds="noise_affine", neighbourhood=3),
        ),
        nonnegative=False,
        input_mean=(0.5, 0.5, 0.5),
        shift_average=True,
        shift_pattern="quincunx",
    ),
    # Colour, 5x5 atoms at full resolution, then a 1x1 stage over their codes (45 KB): about a fifth of the
    # inference cost of csc-ctrl-rgb-s4, about 1.4 dB less at sigma 25.
    "csc-ctrl-rgb-s1": CSCConfig(
        in_channels=3,
        stages=(
            StageConfig(num_atoms=75, kernel_size=5, stride=1, lmbda=0.003, num_steps=8),
            StageConfig(num_atoms=75, kernel_size=1, stride=1, lmbda=0.002, num_steps=3),
        ),
        nonnegative=False,
        input_mean=(0.5, 0.5, 0.5),
    ),
    # Colour, 9x9 atoms on a stride-4 grid averaged over its 16 shifts (cycle spinning), then a 1x1 stage over
    # their codes (130 KB): the first bundled default.
    "csc-ctrl-rgb-s4": CSCConfig(
        in_channels=3,
        stages=(
            StageConfig(num_atoms=96, kernel_size=9, stride=4, lmbda=0.01, num_steps=10),
            StageConfig(num_atoms=96, kernel_size=1, stride=1, lmbda=0.01, num_steps=3),
        ),
        nonnegative=False,
        input_mean=(0.5, 0.5, 0.5),
        shift_average=True,
    ),
    # Where the bundled default started (models/pretrained/README.md): colour, 128 9x9 atoms on a stride-4 grid
    # averaged over its 16 shifts, then a 1x1 stage, both with learned per-step step sizes and thresholds: 7 + 2
    # FISTA steps, about the inference cost of csc-ctrl-rgb-s4 (190 KB).
    "csc-ctrl-rgb-s4-learned": CSCConfig(
        in_channels=3,
        stages=(
            StageConfig(num_atoms=128, kernel_size=9, stride=4, lmbda=0.01, num_steps=7, learned_steps=True),
            StageConfig(num_atoms=128, kernel_size=1, stride=1, lmbda=0.01, num_steps=2, learned_steps=True),
        ),
        nonnegative=False,
        input_mean=(0.5, 0.5, 0.5),
        shift_average=True,
    ),
    # Greyscale counterpart.
    "csc-ctrl-grey": CSCConfig(
        in_channels=1,
        stages=(
            StageConfig(num_atoms=48, kernel_size=7, stride=1, lmbda=0.02, num_steps=8),
            StageConfig(num_atoms=64, kernel_size=3, stride=2, lmbda=0.005, num_steps=4),
        ),
        nonnegative=False,
        input_mean=(0.5,),
    ),
    # A few seconds per hundred iterations: smoke tests and tutorials.
    "tiny": CSCConfig(
        in_channels=3,
        stages=(
            StageConfig(num_atoms=8, kernel_size=5, stride=1, lmbda=0.02, num_steps=3),
            StageConfig(num_atoms=12, kernel_size=3, stride=2, lmbda=0.01, num_steps=2),
        ),
        input_mean=(0.5, 0.5, 0.5),
        nonnegative=False,
    ),
}
