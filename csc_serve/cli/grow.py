"""``csc grow``: more atoms in a stage, larger atoms (computing what the model computes), more or fewer FISTA
steps, per-atom thresholds or a denser grid (to train on)."""

from __future__ import annotations

import argparse
import shlex

from csc_serve.cli.common import add_model_argument, nonnegative_float, positive_int, refuse_to_overwrite


def _grow(args: argparse.Namespace) -> None:
    from pathlib import Path

    from csc_serve.model_store import resolve_model
    from csc_serve.models.grow import deepen, regrid, widen

    out = Path(args.out)
    refuse_to_overwrite(out, args.force)
    resolved = resolve_model(args.model)
    model = resolved.module
    provenance = {"command": shlex.join(["csc", *args.argv]),
                  "grown_from": {"model": resolved.name, **model.config.provenance}}
    moved = model.config.provenance.get("reconstruction_scale_factor")
    if moved:  # the grown model's lmbda_scale 1 was moved as the source's was (csc train --init undoes it)
        provenance["reconstruction_scale_factor"] = moved
    deeper = args.steps is not None or args.thresholds is not None or args.neighbourhood is not None
    factor = args.factor if args.factor is not None else (1 if deeper or args.stride is not None else 2)
    grown = widen(model, args.stage - 1, factor, args.kernel_size, args.perturb, args.seed, provenance)
    if deeper:
        grown = deepen(grown, args.stage - 1, args.steps, args.thresholds, neighbourhood=args.neighbourhood)
    if args.stride is not None:
        grown = regrid(grown, args.stage - 1, args.stride)
    grown.save_pretrained(out)
    stage = grown.config.stages[args.stage - 1]
    print(f"{out}: stage {args.stage} has {stage.num_atoms} atoms of {stage.kernel_size}x{stage.kernel_size} at stride "
          f"{stage.stride}, {stage.num_steps} FISTA steps, {stage.thresholds.replace('_', ' ')} thresholds"
          f"{f' over {stage.neighbourhood}x{stage.neighbourhood} neighbourhoods' if stage.neighbourhood else ''}; "
          f"reconstruct averages {len(grown.config.shifts)} shift(s)")
    print(f"train it with: csc train --init {out} --data DIR --out RUN_DIR ...")


def _window(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 0 or an odd positive integer, got {text!r}") from None
    if value < 0 or (value and value % 2 == 0):
        raise argparse.ArgumentTypeError(f"must be 0 or an odd positive integer, got {text}")
    return value


def add_grow(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "grow",
        help="give a stage more atoms or larger atoms, keeping what the model computes",
        description="Write a copy of MODEL with --factor times the atoms in --stage (every atom repeated; the "
        "next stage reads the repeated codes) and its atoms zero-padded to --kernel-size. With --perturb 0 it "
        "encodes, reconstructs and denoises as MODEL does; a small --perturb moves the copies of each atom apart "
        "so that training (csc train --init OUT) can make them differ. --thresholds per_atom or noise_affine "
        "learns the threshold of every step per atom (and affine in the noise level), starting from what the "
        "model computes; --neighbourhood 3 scales each code's threshold by the energy of its 3x3 neighbourhood of "
        "codes with a learned exponent per step and atom, starting at 0 (the same outputs); --steps adds FISTA "
        "steps, which repeat the last step's learned scalars and change the codes, so train after it, or "
        "removes the steps before the last one (a cheaper model that computes nearly the same where those steps "
        "moved the codes little: measure it with csc eval). The equations are in csc_serve.models.grow.",
    )
    add_model_argument(p)
    p.add_argument("--out", required=True, help="directory for the grown model")
    p.add_argument("--stage", type=positive_int, default=1, help="the stage to grow, from 1 (default: 1)")
    p.add_argument("--factor", type=positive_int, default=None,
                   help="copies of every atom in the stage (default: 2, twice the atoms; 1 with --steps, "
                   "--thresholds, --neighbourhood or --stride)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="FISTA steps of the stage: more repeat the last step's scalars, fewer drop the steps "
                   "before the last (default: unchanged)")
    p.add_argument("--thresholds", choices=("shared", "per_atom", "noise_affine"), default=None,
                   help="learned thresholds of the stage: one scale per step (shared), per step and atom "
                   "(per_atom), or per step and atom and affine in the noise level (noise_affine); "
                   "default: unchanged")
    p.add_argument("--neighbourhood", type=_window, default=None, metavar="N",
                   help="odd window, in code positions, whose energy scales the threshold of every code of the "
                   "stage (needs per_atom or noise_affine thresholds; 0 removes it; default: unchanged)")
    p.add_argument("--stride", type=positive_int, default=None,
                   help="new stride of the stage, a divisor of the current one: k times denser per axis, k^2 "
                   "times the codes and about k^2 times the stage's work per shift (default: unchanged)")
    p.add_argument("--kernel-size", type=positive_int, default=None,
                   help="new odd atom size, at least the current one (default: unchanged)")
    p.add_argument("--perturb", type=nonnegative_float, default=3e-3,
                   help="std of the zero-mean noise that moves the copies of an atom apart, per atom sample, "
                   "before atoms go back to unit norm (default: 3e-3; 0 keeps the output exactly)")
    p.add_argument("--seed", type=int, default=0, help="seed of that noise (default: 0)")
    p.add_argument("--force", action="store_true", help="replace a model already in --out")
    p.set_defaults(run=_grow)
