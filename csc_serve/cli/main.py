"""The ``csc`` command line: one subcommand per job, each with ``--help``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from csc_serve import __version__
from csc_serve.cli.bench import add_bench
from csc_serve.cli.export import add_export
from csc_serve.cli.extract import add_extract
from csc_serve.cli.import_model import add_import
from csc_serve.cli.train import add_eval, add_train

DESCRIPTION = """\
Train, export and serve convolutional sparse coding (CSC-CTRL) autoencoders.

A model is a directory holding config.json and model.safetensors, or the name of a
bundled model. Run 'csc COMMAND --help' for each command's options."""


def _viz(args: argparse.Namespace) -> None:
    from csc_serve.models import load_pretrained
    from csc_serve.training.figures import save_atom_figures

    model = load_pretrained(args.model)
    for path in save_atom_figures(model, args.out, scale=args.scale):
        print(path)


def _add_viz(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "viz",
        help="draw the dictionary atoms of every stage as PNG files",
        description="Draw every stage's atoms in pixel space (deeper atoms are synthesised through the earlier "
        "dictionaries) and write one PNG per stage, atoms_stage<N>.png, into --out.",
    )
    p.add_argument("model", help="model directory or bundled model name")
    p.add_argument("--out", required=True, help="directory for the PNG files (created if missing)")
    p.add_argument("--scale", type=_positive_int, default=4, help="pixels per atom sample (default: 4)")
    p.set_defaults(run=_viz)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    add_train, add_eval, add_export, add_bench, add_extract, add_import, _add_viz
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="csc", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"csc-serve {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except KeyboardInterrupt:
        print("csc: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if not isinstance(err, _user_errors()):
            raise
        print(f"csc {args.run.__name__.lstrip('_')}: error: {err}", file=sys.stderr)  # one line, no traceback
        return 1
    return 0


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that describe bad input or a missing runtime, not a bug (their modules are loaded by then)."""
    errors: list[type[BaseException]] = [ValueError, OSError]
    for module, name in (("csc_serve.backends.base", "BackendUnavailable"), ("csc_serve.export.onnx_export", "ExportError")):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


if __name__ == "__main__":
    sys.exit(main())
