"""fp32 stays fp32 on NVIDIA GPUs: MLX's CUDA backend runs fp32 matmuls of two or more rows in
TF32 unless MLX_ENABLE_TF32=0, while one-row products (a decode step) stay in fp32.

Measured on an H200 (MLX 0.32.4): with TF32, a 2-4-row product of a 576-wide fp32 model is off
by 0.02-0.05 from fp64 where the one-row product is off by 1e-5. Then the MTP lane's verify pass
(D + 1 rows) and a batch of users see other logits than a lone decode step does, and the lane's
output would no longer be exactly the model's own distribution. Without TF32 these small
products were no slower there. A user's own MLX_ENABLE_TF32 wins.

Ignores: bf16 / fp16 models (TF32 never applies), CPUs.
"""

from __future__ import annotations

import os

TF32_ENV_VAR = "MLX_ENABLE_TF32"


def keep_fp32_exact() -> None:
    """Turn MLX's TF32 off unless the user chose; call before mlx runs a matmul."""
    os.environ.setdefault(TF32_ENV_VAR, "0")
