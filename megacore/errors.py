"""The errors a user can act on. The CLI prints their message and exits with status 2; each message
names the file, key or value at fault. Anything else is a bug and keeps its traceback."""

from data_pipeline.errors import DataPipelineError


class MegacoreError(Exception):
    """Base of every error megacore reports to the user as `megacore: error: MESSAGE` (exit 2)."""


class UsageError(MegacoreError, ValueError):
    """A command-line argument that cannot work; the message names it."""


class ConfigError(MegacoreError, ValueError):
    """A configuration problem; the message names the offending key or file."""


class CheckpointError(MegacoreError, ValueError):
    """A checkpoint that is incomplete, altered or incompatible with this run; the message names the file."""


class DataError(MegacoreError, ValueError):
    """Bad data or data settings; the message names the file or key."""


# What the CLI turns into exit 2: our errors, and missing or conflicting paths named by their message.
USER_ERRORS = (MegacoreError, DataPipelineError, FileNotFoundError, FileExistsError)
