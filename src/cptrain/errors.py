"""User-facing error types.

Every mistake a user can make (bad config, bad data, bad checkpoint) raises a subclass of
``CptrainError``; the CLI prints its message as one line and exits with code 2. Anything else
is an internal failure (exit 1).
"""


class CptrainError(Exception):
    """Base class for errors caused by user input; the message is shown as one line."""

    exit_code = 2


class ConfigError(CptrainError):
    """Invalid run or prepare configuration."""


class DataError(CptrainError):
    """Missing, empty, corrupt or inconsistent input data or token shards."""


class CheckpointError(CptrainError):
    """Missing, incomplete or incompatible checkpoint."""


class Stopped(CptrainError):
    """Stopped by a signal (SIGTERM) after checkpointing: resume with --resume."""

    exit_code = 143  # 128 + SIGTERM, what a job scheduler expects of a terminated job


class EnvironmentProblem(CptrainError):
    """The machine lacks something a command needs (apt, disk space, write access)."""
