"""Inference core: arrays and tokens only. Imports nothing of ours outside this package.

The optimized BLAS must be loaded before `mlx.core`, and fp32 kept out of TF32 on NVIDIA GPUs
before MLX reads its settings, so both happen here, before any submodule can import mlx.
"""

from inference.blas import preload_blas
from inference.precision import keep_fp32_exact

keep_fp32_exact()
preload_blas()
