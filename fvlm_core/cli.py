"""The ``fvlm`` command line.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``
(its docstring's first line is the help text). Modules import heavy dependencies inside ``run``
so ``fvlm --help`` stays fast. Errors meant for the user (:class:`~fvlm_core.errors.FVLMError`)
are printed without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from fvlm_core import __version__
from fvlm_core.errors import FVLMError

#: subcommand -> module implementing it (in data-flow order).
COMMANDS: dict[str, str] = {
    "demo": "training.demo",
    "sample-data": "fvlm_core.commands.sample_data",
    "segment": "fvlm_core.commands.segment",
    "labels": "fvlm_core.commands.labels",
    "synth": "fvlm_core.commands.synth",
    "prepare": "fvlm_core.commands.prepare",
    "train": "training.train",
    "import-checkpoint": "fvlm_core.commands.import_checkpoint",
    "analyze": "fvlm_core.commands.analyze",
    "evaluate": "training.evaluate",
}


def _load(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            return None  # the command's module is not part of this build yet
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fvlm",
        description="Fine-grained CT vision-language model (fVLM): segment, train, analyze, evaluate.",
    )
    parser.add_argument("--version", action="version", version=f"fvlm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = _load(module_name)
        if module is None:
            p = sub.add_parser(name, help="(not yet available in this version)")
            p.set_defaults(_run=None, _name=name)
            continue
        doc = (module.__doc__ or name).strip().splitlines()[0]
        p = sub.add_parser(name, help=doc, description=(module.__doc__ or doc).strip())
        module.add_arguments(p)
        p.set_defaults(_run=module.run, _name=name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 1
    if args._run is None:
        print(f"fvlm {args._name}: not yet available in this version.", file=sys.stderr)
        return 3
    try:
        return int(args._run(args) or 0)
    except FVLMError as exc:
        print(f"fvlm {args._name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fvlm {args._name}: interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
