from megacore.parallel.layout import Layout
from megacore.parallel.parallelize import ParallelModel, parallelize

__all__ = ["Layout", "ParallelModel", "parallelize"]
