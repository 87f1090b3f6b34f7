"""The ``fvlm`` command: the library's commands plus training, evaluation and the demo.

It lives in the application layer because it depends on both packages; ``fvlm_core`` never
imports ``fvlm_training``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from fvlm_core import cli as core_cli

#: subcommand -> module implementing it (in data-flow order).
COMMANDS: dict[str, str] = {
    "demo": "fvlm_training.demo",
    **{
        k: v
        for k, v in core_cli.COMMANDS.items()
        if k not in ("analyze", "import-checkpoint", "query", "search")
    },
    "train": "fvlm_training.train",
    "import-checkpoint": core_cli.COMMANDS["import-checkpoint"],
    "analyze": core_cli.COMMANDS["analyze"],
    "embed": "fvlm_training.embed",
    "query": core_cli.COMMANDS["query"],
    "search": core_cli.COMMANDS["search"],
    "evaluate": "fvlm_training.evaluate",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the installed ``fvlm`` script; returns the exit status."""
    return core_cli.main(argv, COMMANDS)


if __name__ == "__main__":
    sys.exit(main())
