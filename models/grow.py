r"""Growing a trained model: more atoms in a stage and larger atoms (computing what it computes), more or fewer
FISTA steps and finer thresholds, a denser grid.

``widen(model, stage, factor, kernel_size)`` returns a model whose stage ``stage`` has ``factor`` times the
atoms, each atom ``d_i`` repeated ``factor`` times, and whose next stage reads the repeated code maps. With
``perturb=0`` it reconstructs, denoises and encodes exactly as ``model`` does (up to float rounding), so
training can go on from it with the new capacity (``csc train --init``):

- Widened stage, ``D' = [D, ..., D]`` (``c = factor`` copies) with the same per-atom weights and learned step
  scales; per-atom thresholds (``tau_kj``, and ``rho_kj`` of noise-affine ones) are those of the atom copied.
  ``D'^T D'`` has the nonzero spectrum of ``D' D'^T = c D D^T``, so ``L' = c L`` and ``eta' = eta / c``.
  FISTA on ``D'`` keeps the ``c`` copies of a code equal; their sum ``v`` then moves as
  ``v <- prox_{eta lmbda w}(v + eta D^T (x - D v))``: the iteration of the original stage. So the copies
  of code ``i`` each hold ``z_i / c``, and ``D' z' = D z``.
- Next stage (its input is now ``[z / c, ..., z / c]``): every atom's input channels are repeated and divided
  by ``sqrt(c)``, which keeps atoms at unit norm and the Gram operator (so ``L``) unchanged. Its Lasso becomes
  the original one for the input ``z / sqrt(c)``; with the penalty weights divided by ``sqrt(c)`` too, its
  codes are the original codes over ``sqrt(c)`` (FISTA is positively homogeneous) and its synthesis gives back
  ``[z^ / c, ..., z^ / c]``, which the widened stage synthesises to ``D z^``.
- Larger atoms: each atom is zero-padded to ``kernel_size`` (odd, not smaller): the same convolutions.

``deepen(model, stage, num_steps, thresholds)`` returns a model whose stage ``stage`` runs ``num_steps`` FISTA
steps and/or learns its thresholds per atom (``StageConfig.thresholds``):

- ``"shared"`` to ``"per_atom"``: ``tau_kj = tau_k`` for every atom; to ``"noise_affine"``: also ``rho_kj = 0``.
  Both compute exactly what ``model`` computes.
- A ``neighbourhood`` (``StageConfig.neighbourhood``) added with exponents ``gamma_kj = 0``: the same outputs
  until trained. A new window keeps the learned exponents (the outputs move); 0 removes them.
- More steps: step ``k >= n`` (``n`` the stage's steps) takes the step size and threshold scales of step
  ``n - 1``, and FISTA's momentum runs on. The codes move (closer to the Lasso minimiser for plain steps), so
  the model needs training (``csc train --init``) to use the steps it gained.
- Fewer steps, ``m < n``: the first ``m - 1`` steps and the last one keep their learned scalars, the steps
  between are dropped (their momentum ``beta_k`` follows the step index, as always). Learned steps give the
  last step its own role (a final step size and threshold), which this keeps; the codes move, by little
  where the dropped steps moved them little. Growing by ``e`` steps and trimming them again gives back the
  model.

``regrid(model, stage, stride)`` puts stage ``stage``'s atoms on a grid ``k = old / new`` times denser per axis
(``stride`` divides the stage's stride). It does not compute what ``model`` computes; it is a start for training
(``csc train --init``):

- Same atoms, same learned scalars. The old grid is a subgrid of the new one: codes placed at every ``k``-th
  position synthesise exactly what they synthesised before (``D' E z = D z``, ``E`` the embedding), so the
  Lasso over the denser grid reaches a lower objective than the old one.
- ``k^2`` times the atoms overlap each pixel, so a code of the new grid carries about ``1 / k^2`` of what one of
  the old grid did: ``lmbda`` of this stage and of every later stage (which code those codes; FISTA is
  positively homogeneous) is multiplied by ``1 / k^2``, so the calibrated ``lmbda_scale`` of a noise level
  stays near its best value. ``L`` of the stage is recomputed (about ``k^2`` times larger).
- The model's total stride shrinks by ``k``, and with it the shifts that ``reconstruct`` averages: the
  ``shift_step`` and ``shift_pattern`` kept where they still apply, else every shift of the new grid.

``perturb > 0`` breaks the symmetry that would keep the copies equal under training: copy ``j`` of atom ``i``
moves by ``perturb * n_ij`` (Gaussian, with zero mean over the copies), then every atom goes back to unit
norm. The model then computes almost, not exactly, what ``model`` does.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F

from .autoencoder import CSCAutoencoder


def widen(
    model: CSCAutoencoder,
    stage: int = 0,
    factor: int = 2,
    kernel_size: int | None = None,
    perturb: float = 0.0,
    seed: int = 0,
    provenance: dict[str, Any] | None = None,
) -> CSCAutoencoder:
    """A copy of ``model`` with ``factor`` times the atoms in stage ``stage`` (0-based) and its atoms
    zero-padded to ``kernel_size`` (default: unchanged), computing what ``model`` computes when ``perturb`` is
    0 (module docstring). ``provenance`` replaces the config's (default: kept)."""
    stages = model.config.stages
    if not 0 <= stage < len(stages):
        raise ValueError(f"stage must be between 1 and {len(stages)} (the model has {len(stages)}), got {stage + 1}")
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be a positive integer, got {factor!r}")
    old = stages[stage]
    size = old.kernel_size if kernel_size is None else kernel_size
    if isinstance(size, bool) or not isinstance(size, int) or size < old.kernel_size or size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and at least the stage's {old.kernel_size}, got {size!r}")
    if not (math.isfinite(perturb) and perturb >= 0):
        raise ValueError(f"perturb must be a non-negative number, got {perturb}")
    grown = list(stages)
    grown[stage] = dataclasses.replace(old, num_atoms=old.num_atoms * factor, kernel_size=size)
    config = dataclasses.replace(model.config, stages=tuple(grown))
    if provenance is not None:
        config = dataclasses.replace(config, provenance=provenance)
    new = CSCAutoencoder(config).to(model.input_mean.device)

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    prefix = f"stages.{stage}."
    pad = (size - old.kernel_size) // 2
    atoms = F.pad(state[prefix + "dictionary"], (pad, pad, pad, pad))  # (K, C, k', k')
    atoms = atoms.repeat(factor, 1, 1, 1)  # copy j of atom i at j K + i
    if perturb > 0 and factor > 1:
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn((factor, old.num_atoms, *atoms.shape[1:]), generator=gen, dtype=torch.float64)
        noise = (noise - noise.mean(0, keepdim=True)).flatten(0, 1)  # zero mean over the copies of an atom
        atoms = atoms + perturb * noise.to(atoms)
    atoms = atoms / atoms.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    state[prefix + "dictionary"] = atoms
    state[prefix + "lmbda_weights"] = state[prefix + "lmbda_weights"].repeat(factor)
    for name in ("threshold_scales", "threshold_slopes", "threshold_exponents"):  # per atom: (steps, K), every
        # copy keeps its atom's (copies hold z / c with thresholds over c: the neighbourhood ratios stay)
        if state.get(prefix + name) is not None and state[prefix + name].dim() == 2:
            state[prefix + name] = state[prefix + name].repeat(1, factor)
    state.pop(prefix + "lipschitz")  # recomputed for the new dictionary
    nxt = f"stages.{stage + 1}."
    if stage + 1 < len(stages):
        root = math.sqrt(factor)
        state[nxt + "dictionary"] = state[nxt + "dictionary"].repeat(1, factor, 1, 1) / root
        state[nxt + "lmbda_weights"] = state[nxt + "lmbda_weights"] / root
    missing, unexpected = new.load_state_dict(state, strict=False)
    if unexpected or missing != [prefix + "lipschitz"]:
        raise RuntimeError(f"widening left parameters unmatched: missing {missing}, unexpected {unexpected}")
    new.stages[stage].update_step_size()
    new.train(model.training)
    return new



def deepen(
    model: CSCAutoencoder,
    stage: int = 0,
    num_steps: int | None = None,
    thresholds: str | None = None,
    provenance: dict[str, Any] | None = None,
    neighbourhood: int | None = None,
) -> CSCAutoencoder:
    """A copy of ``model`` whose stage ``stage`` (0-based) runs ``num_steps`` FISTA steps (default: unchanged;
    fewer drop the steps before the last) with thresholds ``thresholds`` (``"shared"``, ``"per_atom"`` or
    ``"noise_affine"``, at least as fine as now; default: unchanged) and the threshold neighbourhood
    ``neighbourhood`` (default: unchanged), as the module docstring says. ``provenance`` replaces the config's
    (default: kept)."""
    from .config import THRESHOLD_MODES

    stages = model.config.stages
    if not 0 <= stage < len(stages):
        raise ValueError(f"stage must be between 1 and {len(stages)} (the model has {len(stages)}), got {stage + 1}")
    old = stages[stage]
    steps = old.num_steps if num_steps is None else num_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {steps!r}")
    mode = old.thresholds if thresholds is None else thresholds
    if mode not in THRESHOLD_MODES or THRESHOLD_MODES.index(mode) < THRESHOLD_MODES.index(old.thresholds):
        finer = THRESHOLD_MODES[THRESHOLD_MODES.index(old.thresholds):]
        raise ValueError(f"thresholds must be one of {', '.join(finer)} for this stage, got {thresholds!r}")
    if not old.learned_steps and (mode != "shared" or steps != old.num_steps):
        learned = dataclasses.replace(old, learned_steps=True)  # plain FISTA is learned steps at alpha = tau = 1
    else:
        learned = old
    grown = list(stages)
    window = old.neighbourhood if neighbourhood is None else neighbourhood
    grown[stage] = dataclasses.replace(learned, num_steps=steps, thresholds=mode, neighbourhood=window)
    config = dataclasses.replace(model.config, stages=tuple(grown))  # ConfigError for a bad window
    if provenance is not None:
        config = dataclasses.replace(config, provenance=provenance)
    new = CSCAutoencoder(config).to(model.input_mean.device)

    model.ensure_step_sizes()  # the copied step sizes must be those of the copied dictionaries
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    prefix = f"stages.{stage}."
    target = new.stages[stage]
    if target.learned_steps:
        atoms = target.num_atoms
        alpha = state.pop(prefix + "step_scales", torch.ones(old.num_steps))
        tau = state.pop(prefix + "threshold_scales", torch.ones(old.num_steps))  # (n,) or (n, K)
        if mode != "shared" and tau.dim() == 1:
            tau = tau.view(-1, 1).expand(-1, atoms)  # (n, K): tau_kj = tau_k
        # Step k of the new stage takes the scalars of step index[k] of the old one.
        index = list(range(min(steps, old.num_steps) - 1)) + [old.num_steps - 1] * max(1, steps - old.num_steps + 1)
        state[prefix + "step_scales"] = alpha[index].contiguous()
        state[prefix + "threshold_scales"] = tau[index].contiguous()
        if mode == "noise_affine":
            slopes = state.pop(prefix + "threshold_slopes", torch.zeros(old.num_steps, atoms))
            state[prefix + "threshold_slopes"] = slopes[index].contiguous()
        exponents = state.pop(prefix + "threshold_exponents", torch.zeros(old.num_steps, atoms))
        if window:
            state[prefix + "threshold_exponents"] = exponents[index].contiguous()
    new.load_state_dict(state, strict=True)
    new.train(model.training)
    return new


def regrid(
    model: CSCAutoencoder,
    stage: int = 0,
    stride: int = 1,
    provenance: dict[str, Any] | None = None,
) -> CSCAutoencoder:
    """A copy of ``model`` whose stage ``stage`` (0-based) puts its atoms on a grid of stride ``stride`` (a
    divisor of the stage's stride), ``lmbda`` of it and of every later stage divided by ``(old / stride)^2``
    and its ``L`` recomputed (module docstring). ``provenance`` replaces the config's (default: kept)."""
    from .config import ConfigError

    stages = model.config.stages
    if not 0 <= stage < len(stages):
        raise ValueError(f"stage must be between 1 and {len(stages)} (the model has {len(stages)}), got {stage + 1}")
    old = stages[stage]
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1 or old.stride % stride:
        raise ValueError(f"stride must be a positive divisor of the stage's stride {old.stride}, got {stride!r}")
    factor = (stride / old.stride) ** 2
    grown = [dataclasses.replace(s, lmbda=s.lmbda * factor) if i >= stage else s for i, s in enumerate(stages)]
    grown[stage] = dataclasses.replace(grown[stage], stride=stride)
    try:  # the shift settings kept where the new total stride allows them
        config = dataclasses.replace(model.config, stages=tuple(grown))
    except ConfigError:
        config = dataclasses.replace(model.config, stages=tuple(grown), shift_step=1, shift_pattern="grid")
    if provenance is not None:
        config = dataclasses.replace(config, provenance=provenance)
    new = CSCAutoencoder(config).to(model.input_mean.device)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state.pop(f"stages.{stage}.lipschitz")
    missing, unexpected = new.load_state_dict(state, strict=False)
    if unexpected or missing != [f"stages.{stage}.lipschitz"]:
        raise RuntimeError(f"regridding left parameters unmatched: missing {missing}, unexpected {unexpected}")
    new.stages[stage].update_step_size()
    new.train(model.training)
    return new
