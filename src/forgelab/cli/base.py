"""Shared pieces of the command line: the group, consoles, progress bars, options."""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import click
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from forgelab.errors import ConfigError

console = Console(width=None if sys.stdout.isatty() else 150)
error_console = Console(stderr=True)


class Tasks:
    """Progress bars for named stages; silent when stdout is not a terminal."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress
        self.ids: dict[str, int] = {}

    def __call__(self, name: str) -> Callable[[int, int], None]:
        """A callback ``(done, total)`` that advances the bar called ``name``."""

        def update(done: int, total: int) -> None:
            if self.progress is None:
                return
            if name not in self.ids:
                self.ids[name] = self.progress.add_task(name, total=total)
            self.progress.update(self.ids[name], completed=done, total=total)

        return update


@contextlib.contextmanager
def progress_bars() -> Iterator[Tasks]:
    """Yield a :class:`Tasks` factory, with live bars only on a terminal."""
    if not console.is_terminal:
        yield Tasks(None)
        return
    progress = Progress(
        TextColumn("{task.description:<22}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    with progress:
        yield Tasks(progress)


def setup_logging(verbose: int, quiet: bool) -> None:
    """Send library logs to stderr at the level -v/-q ask for."""
    level = logging.WARNING
    if quiet:
        level = logging.ERROR
    elif verbose == 1:
        level = logging.INFO
    elif verbose > 1:
        level = logging.DEBUG
    logging.basicConfig(
        level=level,
        format="%(name)s: %(message)s",
        handlers=[RichHandler(console=error_console, show_path=False, show_time=False)],
        force=True,
    )


def parse_tolerance(value: str) -> float | None:
    """Parse --tolerance: None for 'auto', else a finite non-negative float."""
    if value == "auto":
        return None
    try:
        tolerance = float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither 'auto' nor a number") from None
    if not 0 <= tolerance <= MAX_TOLERANCE:
        raise click.BadParameter(
            f"{value!r} must be a number in [0, {MAX_TOLERANCE:g}] (a weight distance)"
        )
    return tolerance


MAX_TOLERANCE = 1e6
"""Largest fixed tolerance: far above any weight distance, and plottable."""

MAX_SAFETY_FACTOR = 1e6
"""Largest --safety-factor: beyond it tau says nothing, and figures overflow."""


def check_safety_factor(value: float) -> None:
    """Refuse a --safety-factor outside ``(0, MAX_SAFETY_FACTOR]`` (or NaN).

    Raises:
        click.BadParameter: If the value is out of range.
    """
    if not 0 < value <= MAX_SAFETY_FACTOR:
        raise click.BadParameter(
            f"must be a number in (0, {MAX_SAFETY_FACTOR:g}]",
            param_hint="--safety-factor",
        )


class NonEmptyPath(click.Path):
    """A path option that refuses an empty string (silently the current directory)."""

    def convert(self, value, param, ctx):  # noqa: ANN001, ANN201 - click's signature
        """Refuse an empty or blank path, then convert as :class:`click.Path`."""
        if isinstance(value, str) and not value.strip():
            self.fail("must not be empty", param, ctx)
        return super().convert(value, param, ctx)


OUTPUT_PATH = NonEmptyPath(path_type=Path)


_CREATED_OUTPUTS: list[Path] = []
"""Output directories this process created, deepest first (see
:func:`discard_empty_outputs`)."""


def prepare_output(directory: Path, name: str) -> Path:
    """Create an output directory before a long run and return ``directory / name``.

    Checking first means a bad ``--out`` fails in a second, not after the work.
    Directories created here are remembered, so that a run that fails leaves none
    of them behind empty.

    Raises:
        ConfigError: The directory cannot be created or written, or ``name`` in it
            is a directory.
    """
    missing = []
    probe = directory
    while not probe.exists() and not probe.is_symlink() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _CREATED_OUTPUTS.extend(missing)
    except OSError as error:
        raise ConfigError(
            f"cannot create output directory {directory}: {error.strerror}"
        ) from None
    destination = directory / name
    if destination.is_dir():
        raise ConfigError(f"{destination} is a directory; choose another --out")
    try:
        # a file really created and removed: permission bits do not tell for root,
        # and pseudo file systems such as /proc refuse new files whatever they say
        with tempfile.NamedTemporaryFile(dir=directory, prefix=f".{name}."):
            pass
    except OSError as error:
        raise ConfigError(
            f"cannot write into output directory {directory}: {error.strerror}"
        ) from None
    return destination


def discard_empty_outputs(*, remove: bool) -> None:
    """Forget the output directories this run created, deleting the empty ones.

    Empty ones are deleted only with ``remove``, which the entry point sets when a
    command fails or is interrupted; a directory holding anything, even a partial
    result, stays.
    """
    while _CREATED_OUTPUTS:
        path = _CREATED_OUTPUTS.pop(0)
        if remove:
            with contextlib.suppress(OSError):
                path.rmdir()


def positive_int(
    _ctx: click.Context, param: click.Parameter, value: int | None
) -> int | None:
    """Click callback rejecting counts below 1."""
    if value is not None and value < 1:
        raise click.BadParameter(f"must be >= 1, got {value}")
    return value


SEED = click.IntRange(0, 2**63 - 1)
"""Seeds: what numpy and torch generators both accept."""

data_dir_option = click.option(
    "--data-dir",
    type=NonEmptyPath(path_type=Path),
    default=None,
    help="Directory with the dataset's standard files (default: embedded copy).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors.")
@click.version_option(package_name="forgelab")
def cli(verbose: int, quiet: bool) -> None:
    """Record, replay, forge and verify SGD execution traces."""
    setup_logging(verbose, quiet)
