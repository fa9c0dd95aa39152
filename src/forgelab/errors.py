"""Error types and the exit codes the command line maps them to."""

EXIT_ACCEPTED = 0
EXIT_REJECTED = 1
EXIT_UNUSABLE = 2
EXIT_INTERRUPTED = 130
"""Stopped by Ctrl-C or SIGTERM, as shells report a SIGINT (128 + 2)."""


class ForgelabError(Exception):
    """Base class of every error forgelab raises on purpose.

    Its message is one line meant for the user; the command line prints it and exits
    with ``exit_code``.
    """

    exit_code = EXIT_UNUSABLE


class DataError(ForgelabError):
    """A dataset is unknown, missing or malformed."""


class TraceError(ForgelabError):
    """A trace is malformed, inconsistent or unsafe to load."""


class ConfigError(ForgelabError):
    """An option or a model/optimizer/loss name is invalid."""


class UndecidableError(ForgelabError):
    """The verifier cannot tell honest from forged steps for this trace.

    Raised when benign recomputations of a step disagree too much for any tolerance
    to separate them from forgeries; the trace is not accepted.
    """

    exit_code = EXIT_REJECTED
