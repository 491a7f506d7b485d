"""The ``mmkd`` command: one entry point for mmkd's command-line tools (``mmkd push DIR --repo-id ID``).

Each subcommand is a module with ``main(argv, prog) -> int``, imported only when it runs, so ``mmkd --help`` does
not load torch.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

COMMANDS: dict[str, tuple[str, str]] = {
    "push": ("mmkd.push", "push a trained student folder to the Hugging Face Hub"),
}


def _usage() -> str:
    lines = ["usage: mmkd COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<8}{help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "mmkd COMMAND --help describes a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``argv[0]`` to its subcommand; returns the exit status (2 for an unknown command)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"mmkd: error: unknown command {name!r} (commands: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest, prog=f"mmkd {name}")


if __name__ == "__main__":
    sys.exit(main())
