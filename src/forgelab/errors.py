"""Error types and the exit codes the command line maps them to."""

EXIT_ACCEPTED = 0
EXIT_REJECTED = 1
EXIT_UNUSABLE = 2


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
