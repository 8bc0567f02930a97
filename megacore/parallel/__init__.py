from megacore.parallel.parallelize import build_mesh, parallelize

__all__ = ["build_mesh", "parallelize"]
