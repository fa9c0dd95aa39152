"""The ``forgelab`` command line.

Exit codes: 0 success (a verified trace was accepted), 1 a trace was rejected,
2 unusable input (bad options, malformed or unsafe trace, missing data), 130
interrupted (Ctrl-C or SIGTERM).

Each command lives in its own module and registers itself on the group ``cli``.
"""

from __future__ import annotations

import signal
import sys
import threading

import click

from forgelab.cli import (  # noqa: F401 - registers the commands
    bench,
    evaluate,
    forge,
    reproduce,
    theory,
    train,
    verify,
)
from forgelab.cli.base import cli, discard_empty_outputs
from forgelab.errors import (
    EXIT_ACCEPTED,
    EXIT_INTERRUPTED,
    EXIT_REJECTED,
    EXIT_UNUSABLE,
    ForgelabError,
)

__all__ = ["cli", "main"]


def _one_line(error: Exception) -> str:
    """An error message on one line, whatever the file names in it contain."""
    return " ".join(str(error).split())


def _terminate(signum: int, _frame: object) -> None:
    # unwind like Ctrl-C, so that partial outputs and temporary files are removed
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the command line and map errors to exit codes."""
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        return _run(argv)
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)


_NO_ARGS = getattr(click.exceptions, "NoArgsIsHelpError", ())
"""Raised by click 8.2 and newer for a bare ``forgelab``."""


def _run(argv: list[str] | None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        # the context is made and invoked here rather than by ``cli.main``, which
        # would print a blank line of its own before an interruption
        with cli.make_context("forgelab", args) as context:
            code = cli.invoke(context)
    except click.exceptions.Exit as done:
        code = done.exit_code
    except _NO_ARGS as error:
        print(error.ctx.get_help(), file=sys.stderr)
        code = EXIT_UNUSABLE
    except click.ClickException as error:
        # one line, like every other rejection; -h shows the usage
        command = f" {error.ctx.command_path}" if getattr(error, "ctx", None) else ""
        print(
            f"forgelab: error: {_one_line(error.format_message())} "
            f"(see 'forgelab{command.replace(' forgelab', '')} -h')",
            file=sys.stderr,
        )
        code = EXIT_UNUSABLE
    except (click.exceptions.Abort, KeyboardInterrupt):
        print("forgelab: interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except ForgelabError as error:
        print(f"forgelab: error: {_one_line(error)}", file=sys.stderr)
        code = error.exit_code
    except OSError as error:
        # the file and the reason, without Python's "[Errno N]" prefix
        where = f"{error.filename}: " if error.filename else ""
        reason = error.strerror or str(error)
        print(f"forgelab: error: {_one_line(where + reason)}", file=sys.stderr)
        code = EXIT_UNUSABLE
    code = EXIT_ACCEPTED if code is None else int(code)
    # a failed or interrupted run leaves no empty output directory behind
    discard_empty_outputs(remove=code not in (EXIT_ACCEPTED, EXIT_REJECTED))
    return code


if __name__ == "__main__":
    sys.exit(main())
