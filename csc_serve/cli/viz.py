"""``csc viz``: every stage's dictionary atoms, drawn in pixel space, one PNG per stage."""

from __future__ import annotations

import argparse

from csc_serve.cli.common import add_model_argument, positive_int


def _viz(args: argparse.Namespace) -> None:
    from csc_serve.model_store import resolve_model
    from csc_serve.training.figures import save_atom_figures

    model = resolve_model(args.model).module
    for path in save_atom_figures(model, args.out, scale=args.scale):
        print(path)


def add_viz(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "viz",
        help="draw the dictionary atoms of every stage as PNG files",
        description="Draw every stage's atoms in pixel space (deeper atoms are synthesised through the earlier "
        "dictionaries) and write one PNG per stage, atoms_stage<N>.png, into --out.",
    )
    add_model_argument(p)
    p.add_argument("--out", required=True, help="directory for the PNG files (created if missing)")
    p.add_argument("--scale", type=positive_int, default=4, help="pixels per atom sample (default: 4)")
    p.set_defaults(run=_viz)
