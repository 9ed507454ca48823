"""MLX arrays as the host tensors an SSD file holds (kv_ssd_format.HostTensor): dtype codes and bits.

Ignores: files (kv_ssd_format.py), threads and when arrays are read back (the callers).
"""

from __future__ import annotations

from inference.kv_ssd_format import HostTensor

import mlx.core as mx
import numpy as np

HOST_DTYPES = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16"}


def host_tensor(array: mx.array) -> HostTensor | None:
    """A view of an evaluated array's memory (it must not change after), or None for a dtype
    the files do not hold. numpy has no bfloat16: it travels as its uint16 bits."""
    code = HOST_DTYPES.get(array.dtype)
    if code is None:
        return None
    if array.dtype == mx.bfloat16:
        array = array.view(mx.uint16)
    return HostTensor(code, np.asarray(memoryview(array)))
