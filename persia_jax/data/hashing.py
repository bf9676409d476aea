"""Stable 64-bit feature IDs for categorical values.

A categorical value becomes a uint64 feature ID through

  feature_id(name, value) = splitmix64(fnv1a64(utf8(name) + b"\\x1f" + value))

where `value` is the raw bytes of the field as it appears in the file (an empty
field hashes the empty string, so "missing" gets its own embedding row),
`fnv1a64` is the 64-bit FNV-1a hash (offset basis 0xcbf29ce484222325, prime
0x100000001b3, one byte at a time: h ^= byte, then h *= prime mod 2**64) and
`splitmix64` is the finaliser of Vigna's SplitMix64 generator:

  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
  z = (z ^ (z >> 27)) * 0x94d049bb133111eb
  z = z ^ (z >> 31)

Because the feature name is hashed first, equal strings in two columns give
different IDs. The 0x1F byte (ASCII unit separator) keeps ("ab", "c") apart
from ("a", "bc"). Integers (derived features such as hour-of-day, libsvm
indices, synthetic IDs) hash as their decimal text, so `hash_ints(name, [5])`
equals `feature_id(name, "5")`.

The kernels take a bytes buffer with start and end offsets per value, which is
both what the text tokenizer produces and what an Arrow string array stores.
"""

from __future__ import annotations

import numba
import numpy as np

FNV_OFFSET_BASIS = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
NAME_SEPARATOR = 0x1F
_MASK64 = (1 << 64) - 1

_PRIME = np.uint64(FNV_PRIME)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)


# ----------------------------------------------------------------------------
# Plain-Python reference, used by tests and for single values.
# ----------------------------------------------------------------------------
def fnv1a64(data: bytes, state: int = FNV_OFFSET_BASIS) -> int:
  """Returns the FNV-1a-64 state after hashing `data` starting from `state`."""
  for byte in data:
    state = ((state ^ byte) * FNV_PRIME) & _MASK64
  return state


def splitmix64(z: int) -> int:
  """Returns the SplitMix64 finaliser of a 64-bit integer."""
  z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
  z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
  return z ^ (z >> 31)


def name_state(name: str) -> int:
  """Returns the FNV state after hashing the feature name and the separator."""
  return fnv1a64(name.encode("utf-8") + bytes([NAME_SEPARATOR]))


def feature_id(name: str, value: str | bytes) -> int:
  """Returns the uint64 feature ID of one value of feature `name` (a Python int)."""
  if isinstance(value, str):
    value = value.encode("utf-8")
  return splitmix64(fnv1a64(value, name_state(name)))


# ----------------------------------------------------------------------------
# Vectorized kernels.
# ----------------------------------------------------------------------------
@numba.njit(nogil=True, cache=True, inline="always")
def _finalize(z):
  z = (z ^ (z >> _S30)) * _MIX1
  z = (z ^ (z >> _S27)) * _MIX2
  return z ^ (z >> _S31)


@numba.njit(nogil=True, cache=True, inline="always")
def _hash_bytes(buf, start, end, state):
  h = state
  for k in range(start, end):
    h = (h ^ np.uint64(buf[k])) * _PRIME
  return _finalize(h)


@numba.njit(nogil=True, cache=True)
def _hash_spans_kernel(buf, starts, ends, state):
  n = starts.shape[0]
  out = np.empty(n, np.uint64)
  for i in range(n):
    out[i] = _hash_bytes(buf, starts[i], ends[i], state)
  return out


@numba.njit(nogil=True, cache=True)
def _hash_ints_kernel(values, state):
  n = values.shape[0]
  out = np.empty(n, np.uint64)
  digits = np.empty(20, np.uint8)
  for i in range(n):
    v = values[i]
    h = state
    if v < 0:
      h = (h ^ np.uint64(45)) * _PRIME  # "-"
      # Negate through uint64 so that the minimum int64 does not overflow.
      u = np.uint64(0) - np.uint64(v)
    else:
      u = np.uint64(v)
    count = 0
    while True:
      digits[count] = np.uint8(48 + u % np.uint64(10))
      u = u // np.uint64(10)
      count += 1
      if u == 0:
        break
    for k in range(count - 1, -1, -1):
      h = (h ^ np.uint64(digits[k])) * _PRIME
    out[i] = _finalize(h)
  return out


@numba.njit(nogil=True, cache=True)
def _hash_multi_kernel(buf, starts, ends, delimiter, state, empty_as_missing):
  n = starts.shape[0]
  lengths = np.empty(n, np.int32)
  total = 0
  for i in range(n):
    if ends[i] == starts[i]:
      count = 1 if empty_as_missing else 0
    else:
      count = 1
      for k in range(starts[i], ends[i]):
        if buf[k] == delimiter:
          count += 1
    lengths[i] = count
    total += count
  ids = np.empty(total, np.uint64)
  j = 0
  for i in range(n):
    if ends[i] == starts[i]:
      if empty_as_missing:
        ids[j] = _hash_bytes(buf, starts[i], starts[i], state)
        j += 1
      continue
    token_start = starts[i]
    for k in range(starts[i], ends[i] + 1):
      if k == ends[i] or buf[k] == delimiter:
        ids[j] = _hash_bytes(buf, token_start, k, state)
        j += 1
        token_start = k + 1
  return ids, lengths


def hash_spans(name: str, buf: np.ndarray, starts: np.ndarray,
               ends: np.ndarray) -> np.ndarray:
  """Hashes one categorical value per row.

  Args:
    name: feature name, hashed in front of every value.
    buf: uint8 [num_bytes] buffer holding the values.
    starts: int64 [n] byte offset of each value in `buf`.
    ends: int64 [n] end offset (exclusive) of each value.

  Returns:
    uint64 [n] feature IDs.
  """
  return _hash_spans_kernel(buf, starts, ends, np.uint64(name_state(name)))


def hash_ints(name: str, values: np.ndarray) -> np.ndarray:
  """Hashes int64 [n] values as their decimal text; returns uint64 [n] IDs."""
  values = np.ascontiguousarray(values, dtype=np.int64)
  return _hash_ints_kernel(values, np.uint64(name_state(name)))


def hash_multi(name: str, buf: np.ndarray, starts: np.ndarray, ends: np.ndarray,
               delimiter: str, empty_as_missing: bool = True
               ) -> tuple[np.ndarray, np.ndarray]:
  """Splits each value at `delimiter` and hashes every token.

  Args:
    name: feature name.
    buf, starts, ends: the values, as in `hash_spans`.
    delimiter: one ASCII character between tokens, such as "^".
    empty_as_missing: if True, an empty field gives one ID, the hash of the
      empty string (like a missing single-valued feature); if False it gives
      no IDs (length 0). An empty token between two delimiters always hashes
      the empty string.

  Returns:
    (ids uint64 [total], lengths int32 [n]).
  """
  if len(delimiter.encode()) != 1:
    raise ValueError(f"Multi-value delimiter must be one ASCII character, got {delimiter!r}.")
  return _hash_multi_kernel(buf, starts, ends, np.uint8(ord(delimiter)),
                            np.uint64(name_state(name)), empty_as_missing)
