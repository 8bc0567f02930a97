"""The errors a user can act on, in one hierarchy. The CLI prints their message as `megacore: error:
MESSAGE` and exits with status 2; each is raised where the fault is known, and its message names the
file, key or value at fault. Anything else (a ValueError included) is a bug and keeps its traceback.

    MegacoreError
    ├── UsageError        a command-line argument that cannot work
    ├── ConfigError       a config key, or keys that contradict each other
    ├── CheckpointError   a checkpoint that is incomplete, altered or incompatible
    ├── StorageError      an object-store URL that cannot be used (endpoint, credentials, bucket)
    └── DataError         bad data or data settings (data_pipeline.errors.DataPipelineError is this class)
        ├── SourceError       a raw source that cannot be read
        ├── ShardError        a prepared token shard that is missing, altered or holds foreign ids
        └── ChatFormatError   a chat record or chat template that cannot be rendered

(launcher/slurm.py adds SlurmError.) The concrete classes are also ValueErrors, as they always were, so
that code catching ValueError around them keeps working. This module imports nothing of megacore or
data_pipeline: both packages raise these classes.
"""


class MegacoreError(Exception):
    """Base of every error megacore reports to the user as `megacore: error: MESSAGE` (exit 2)."""


class UsageError(MegacoreError, ValueError):
    """A command-line argument that cannot work; the message names it."""


class ConfigError(MegacoreError, ValueError):
    """A configuration problem; the message names the offending key or file."""


class CheckpointError(MegacoreError, ValueError):
    """A checkpoint that is incomplete, altered or incompatible with this run; the message names the file."""


class StorageError(MegacoreError, ValueError):
    """A durable location (an s3://, gs://, az:// URL) that cannot be reached or used; the message names
    the URL and the cause, never a secret."""


class DataError(MegacoreError, ValueError):
    """Bad input data or data settings: a source, a prepared directory, a tokenizer, a loader state that
    does not fit the data; the message names the file, key or value."""


class SourceError(DataError):
    """A raw source that cannot be read."""


class ShardError(DataError):
    """A prepared token shard that is missing, altered, or holds ids the tokenizer does not have."""


class ChatFormatError(DataError):
    """A chat record that is not a conversation, or a tokenizer whose chat template cannot render it."""


# What the CLI (and each rank of a run: megacore/train/trainer.py, launcher/torchrun.py) reports as one
# message with exit 2: our errors, and missing or conflicting paths named by their message.
USER_ERRORS = (MegacoreError, FileNotFoundError, FileExistsError)
