from megacore.parallel.parallelize import ParallelModel, build_mesh, parallelize

__all__ = ["ParallelModel", "build_mesh", "parallelize"]
