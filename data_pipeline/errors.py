"""Errors about input data that a user can act on; each message names the file (and line) at fault.
The `megacore` CLI reports them as `megacore: error: MESSAGE` with exit status 2."""


class DataPipelineError(ValueError):
    """Bad input data or data settings."""


class SourceError(DataPipelineError):
    """A raw source that cannot be read."""


class ShardError(DataPipelineError):
    """A prepared token shard that is missing, altered, or holds ids the tokenizer does not have."""
