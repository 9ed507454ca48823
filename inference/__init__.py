"""Inference core: arrays and tokens only. Imports nothing of ours outside this package.

The optimized BLAS must be loaded before `mlx.core`, so it happens here, before any submodule
can import mlx.
"""

from inference.blas import preload_blas

preload_blas()
