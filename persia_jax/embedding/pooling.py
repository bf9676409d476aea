"""Numba kernels of the embedding worker: ID deduplication, pooling and its backward.

Every kernel is compiled with `nogil=True`, so several threads that each
process a different batch run them in parallel, and with `cache=True`, so the
compiled code is reused across processes.

Pooled features read their rows through an inverse index: `rows` contains one
float32 row per unique ID of a table, and `inverse[j]` is the row of the j-th
ID of a feature. A sample's IDs are `inverse[offsets[b]:offsets[b + 1]]`.
"""

from __future__ import annotations

import numba
import numpy as np

from persia_jax.embedding import kernels

# Pooling modes as the kernels see them.
POOL_NONE = 0  # Exactly one ID per sample; computed like a sum.
POOL_SUM = 1
POOL_MEAN = 2
POOL_SQRTN = 3
POOLING_MODES = {"none": POOL_NONE, "sum": POOL_SUM, "mean": POOL_MEAN,
                 "sqrtn": POOL_SQRTN}

# Largest finite values of the wire dtypes. Larger magnitudes are clamped to
# these before the cast so that the cast never produces inf.
FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504.0
BFLOAT16_MAX = 3.3895313892515355e38  # (2 - 2**-7) * 2**127.

@numba.njit(nogil=True, cache=True)
def _dedup_hash_kernel(ids):
  n = ids.shape[0]
  slots, mask, shift = kernels.local_table(n)
  unique = np.empty(n, np.uint64)
  inverse = np.empty(n, np.int32)
  num_unique = 0
  for i in range(n):
    key = ids[i]
    slot, index = kernels.local_find(slots, mask, shift, unique, key)
    if index < 0:
      slots[slot] = num_unique
      unique[num_unique] = key
      index = num_unique
      num_unique += 1
    inverse[i] = index
  return unique[:num_unique].copy(), inverse


def dedup_hash(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Deduplicates IDs with an open-addressing hash table.

  Args:
    ids: uint64 [n].

  Returns:
    unique: uint64 [u], in order of first occurrence.
    inverse: int32 [n], with `unique[inverse] == ids`.
  """
  return _dedup_hash_kernel(np.ascontiguousarray(ids, dtype=np.uint64))


def dedup_sort(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Deduplicates IDs by sorting (`np.unique`); returns sorted unique uint64 [u] and int32 [n] inverse."""
  unique, inverse = np.unique(ids, return_inverse=True)
  return unique, inverse.astype(np.int32, copy=False)


DEDUP_METHODS = {"hash": dedup_hash, "sort": dedup_sort}


@numba.njit(nogil=True, cache=True, inline="always")
def _clamp_row(out_row, limit):
  """Clamps |x| > limit to +-limit in place; returns (clamped, nan) counts."""
  clamped = 0
  nans = 0
  for d in range(out_row.shape[0]):
    value = out_row[d]
    if value > limit:
      out_row[d] = limit
      clamped += 1
    elif value < -limit:
      out_row[d] = -limit
      clamped += 1
    elif value != value:
      nans += 1
  return clamped, nans


@numba.njit(nogil=True, cache=True)
def pool_forward(rows, inverse, offsets, mode, limit, out):
  """Pools the rows of each sample into `out` and clamps the result.

  Args:
    rows: float32 [u, dim], one row per unique ID.
    inverse: int [n], row index of each ID of the feature.
    offsets: int64 [batch + 1], start of each sample in `inverse`.
    mode: one of POOL_NONE, POOL_SUM, POOL_MEAN, POOL_SQRTN.
    limit: values with magnitude above `limit` are set to +-limit; pass inf to
      keep every value.
    out: float32 [batch, dim], written in full. An empty sample gets zeros.

  Returns:
    (number of clamped values, number of NaN values) in `out`.
  """
  batch = offsets.shape[0] - 1
  dim = rows.shape[1]
  clamped = 0
  nans = 0
  for b in range(batch):
    start = offsets[b]
    end = offsets[b + 1]
    out_row = out[b]
    for d in range(dim):
      out_row[d] = 0.0
    for j in range(start, end):
      row = rows[inverse[j]]
      for d in range(dim):
        out_row[d] += row[d]
    length = end - start
    if length > 1 and mode != POOL_SUM and mode != POOL_NONE:
      if mode == POOL_MEAN:
        scale = np.float32(1.0 / length)
      else:
        scale = np.float32(1.0 / np.sqrt(length))
      for d in range(dim):
        out_row[d] *= scale
    row_clamped, row_nans = _clamp_row(out_row, limit)
    clamped += row_clamped
    nans += row_nans
  return clamped, nans


@numba.njit(nogil=True, cache=True)
def pool_raw_forward(rows, inverse, offsets, limit, out, mask):
  """Copies the first `max_len` rows of each sample, zero-padded, with a mask.

  Args:
    rows: float32 [u, dim].
    inverse: int [n], row index of each kept ID.
    offsets: int64 [batch + 1]; no sample has more than `max_len` IDs.
    limit: clamp magnitude as in `pool_forward`.
    out: float32 [batch, max_len, dim], written in full.
    mask: float32 [batch, max_len], 1 where `out` holds a row, else 0.

  Returns:
    (number of clamped values, number of NaN values) in `out`.
  """
  batch = offsets.shape[0] - 1
  max_len = out.shape[1]
  dim = rows.shape[1]
  clamped = 0
  nans = 0
  for b in range(batch):
    start = offsets[b]
    length = offsets[b + 1] - start
    for k in range(max_len):
      out_row = out[b, k]
      if k < length:
        row = rows[inverse[start + k]]
        for d in range(dim):
          out_row[d] = row[d]
        mask[b, k] = 1.0
        row_clamped, row_nans = _clamp_row(out_row, limit)
        clamped += row_clamped
        nans += row_nans
      else:
        for d in range(dim):
          out_row[d] = 0.0
        mask[b, k] = 0.0
  return clamped, nans


@numba.njit(nogil=True, cache=True)
def pool_backward(grads, inverse, offsets, mode, table_grads):
  """Adds the gradient of `pool_forward` with respect to the unique rows.

  Each ID of sample b receives `grads[b] * scale`, where scale is 1 (none,
  sum), 1 / len (mean) or 1 / sqrt(len) (sqrtn). IDs that occur several times
  receive the sum. Empty samples contribute nothing.

  Args:
    grads: float32 [batch, dim], gradient of the pooled output.
    inverse: int [n], as passed to `pool_forward`.
    offsets: int64 [batch + 1].
    mode: pooling mode used in the forward pass.
    table_grads: float32 [u, dim], accumulated in place.

  Returns:
    Number of non-finite values in `grads` of non-empty samples.
  """
  batch = offsets.shape[0] - 1
  dim = grads.shape[1]
  nonfinite = 0
  for b in range(batch):
    start = offsets[b]
    end = offsets[b + 1]
    length = end - start
    if length == 0:
      continue
    if mode == POOL_MEAN:
      scale = np.float32(1.0 / length)
    elif mode == POOL_SQRTN:
      scale = np.float32(1.0 / np.sqrt(length))
    else:
      scale = np.float32(1.0)
    grad_row = grads[b]
    for d in range(dim):
      if not np.isfinite(grad_row[d]):
        nonfinite += 1
    for j in range(start, end):
      target = table_grads[inverse[j]]
      for d in range(dim):
        target[d] += scale * grad_row[d]
  return nonfinite


@numba.njit(nogil=True, cache=True)
def pool_raw_backward(grads, inverse, offsets, table_grads):
  """Adds the gradient of `pool_raw_forward`; padded positions contribute nothing.

  Args:
    grads: float32 [batch, max_len, dim].
    inverse: int [n], offsets: int64 [batch + 1], as in the forward pass.
    table_grads: float32 [u, dim], accumulated in place.

  Returns:
    Number of non-finite values in `grads` at unpadded positions.
  """
  batch = offsets.shape[0] - 1
  dim = grads.shape[2]
  nonfinite = 0
  for b in range(batch):
    start = offsets[b]
    length = offsets[b + 1] - start
    for k in range(length):
      grad_row = grads[b, k]
      target = table_grads[inverse[start + k]]
      for d in range(dim):
        value = grad_row[d]
        if not np.isfinite(value):
          nonfinite += 1
        target[d] += value
  return nonfinite


@numba.njit(nogil=True, cache=True)
def truncate_positions(lengths, max_len):
  """Selects the first `max_len` IDs of each sample.

  Args:
    lengths: int [batch], IDs per sample.
    max_len: maximum IDs kept per sample.

  Returns:
    keep: int64 [kept], indices into the concatenated IDs.
    offsets: int64 [batch + 1], offsets of the kept IDs.
  """
  batch = lengths.shape[0]
  offsets = np.zeros(batch + 1, np.int64)
  for b in range(batch):
    offsets[b + 1] = offsets[b] + min(lengths[b], max_len)
  keep = np.empty(offsets[batch], np.int64)
  source = 0
  for b in range(batch):
    kept = offsets[b + 1] - offsets[b]
    for k in range(kept):
      keep[offsets[b] + k] = source + k
    source += lengths[b]
  return keep, offsets
