"""The data errors a user can act on; each message names the file (and line), key or value at fault.
They are part of megacore's one error hierarchy (megacore/errors.py), re-exported here under the names
data_pipeline code has always used; the `megacore` CLI reports them as `megacore: error: MESSAGE` with
exit status 2."""

from megacore.errors import ChatFormatError, DataError, ShardError, SourceError

# The name of DataError in the data pipeline before the two trees became one (the same class).
DataPipelineError = DataError

__all__ = ["ChatFormatError", "DataError", "DataPipelineError", "ShardError", "SourceError"]
