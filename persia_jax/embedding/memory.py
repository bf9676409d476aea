"""Host arrays aligned to cache lines.

On JAX's CPU backend, `jax.device_put` of a numpy array whose data pointer is
64-byte aligned shares that memory instead of copying it, and 64-byte rows
never straddle a cache line, so every table and lookup buffer is allocated here.
"""

from __future__ import annotations

import math

import numpy as np

ALIGNMENT = 64


def aligned_empty(shape, dtype, alignment: int = ALIGNMENT) -> np.ndarray:
  """Returns an uninitialised C-contiguous array whose data starts on `alignment` bytes."""
  dtype = np.dtype(dtype)
  shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
  nbytes = math.prod(int(size) for size in shape) * dtype.itemsize
  raw = np.empty(nbytes + alignment, np.uint8)
  start = (-raw.ctypes.data) % alignment
  return raw[start:start + nbytes].view(dtype).reshape(shape)


def aligned_zeros(shape, dtype, alignment: int = ALIGNMENT) -> np.ndarray:
  """Returns a zero-filled array aligned like `aligned_empty`."""
  out = aligned_empty(shape, dtype, alignment)
  out.fill(0)
  return out


def is_aligned(array: np.ndarray, alignment: int = ALIGNMENT) -> bool:
  return array.ctypes.data % alignment == 0
