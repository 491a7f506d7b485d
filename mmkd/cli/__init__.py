"""The ``mmkd`` command: one entry point for every command-line tool (``mmkd zeroshot ...``, ``mmkd push ...``).

:data:`COMMANDS` is the table: each command names the module holding its ``build_parser(prog)`` and ``run(args)``,
imported only when the command runs, so ``mmkd --help`` does not load torch. Every command reports bad input the
same way (:func:`fail`): one line on stderr, ``mmkd <command>: error: ...``, and exit status 2. ``python -m mmkd.eval.
zeroshot``, ``python -m mmkd.eval.bias``, ``python -m mmkd.report``, ``python -m mmkd.export`` and ``python -m
mmkd.push`` are the same commands.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

COMMANDS: dict[str, tuple[str, str]] = {
    "zeroshot": ("mmkd.cli.zeroshot", "zero-shot top-1/top-5 accuracy, CLIP_benchmark's protocol"),
    "bias": ("mmkd.cli.bias", "gender-profession association of a text tower, and teacher vs student"),
    "report": ("mmkd.cli.report", "compression report: size, throughput, int8 and zero-shot accuracy"),
    "export": ("mmkd.cli.export", "export a CLIP student as an open_clip checkpoint"),
    "push": ("mmkd.cli.push", "push a trained student folder to the Hugging Face Hub"),
}


class CommandError(Exception):
    """Bad input to a command: :func:`main` prints it as one line and exits with ``status``."""

    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.status = status


def one_line(error: BaseException | str) -> str:
    """An error as one line of text (its type's name when it has no message)."""
    text = " ".join(str(error).split())
    return text or (type(error).__name__ if isinstance(error, BaseException) else "")


def fail(prog: str, error: BaseException | str, status: int = 2) -> int:
    """Print ``<prog>: error: <one line>`` to stderr and return ``status``: every command's bad-input exit."""
    print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
    return status


def _usage() -> str:
    lines = ["usage: mmkd COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<10}{help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "mmkd COMMAND --help describes a command's options."]
    return "\n".join(lines)


def run_command(name: str, argv: Sequence[str], prog: str | None = None) -> int:
    """Parse ``argv`` with the command's parser and run it; a :class:`CommandError` (or an ``OSError`` /
    ``ValueError`` / ``TypeError`` the command lets through) ends as one line and exit status 2."""
    prog = prog or f"mmkd {name}"
    module = importlib.import_module(COMMANDS[name][0])
    args = module.build_parser(prog).parse_args(list(argv))
    try:
        return int(module.run(args, prog) or 0)
    except CommandError as err:
        return fail(prog, err, err.status)
    except (OSError, ValueError, TypeError) as err:
        return fail(prog, err)


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``argv[0]`` to its command; returns the exit status (2 for an unknown command)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        return fail("mmkd", f"unknown command {name!r} (commands: {', '.join(COMMANDS)})")
    return run_command(name, rest)


if __name__ == "__main__":
    sys.exit(main())
