"""The embedding worker: sits between the embedding stores and the dense NN workers.

Forward (`lookup`): for each table, concatenate the IDs of every feature that
reads it, deduplicate them, fetch each unique row once from the store, then
pool the rows per sample and feature and cast the activations to the wire
dtype. Backward (`backward`): cast the incoming activation gradients back to
float32 and scatter-add them into one gradient per unique ID and table, which
`apply` hands to the stores.

With a float16 or bfloat16 wire dtype, activation values whose magnitude
exceeds the largest finite value of that dtype are clamped to it (and counted
in `stats()["clamped_values"]`), so the cast never creates inf. NaN stays NaN,
because replacing it would hide a diverged row from the dense side, and it is
counted in `stats()["nan_values"]`.

Several threads may call `lookup`, `backward` and `apply` on different batches
at the same time: the kernels release the GIL and the worker keeps no
per-batch state outside the returned `LookupContext`.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np

from persia_jax.data.batch import SparseInput
from persia_jax.embedding import pooling
from persia_jax.embedding.api import EmbeddingStoreAPI
from persia_jax.embedding.buffers import BufferPool
from persia_jax.embedding.features import FeatureSpec

WIRE_DTYPES = {
    "float32": (np.dtype(np.float32), float("inf")),
    "float16": (np.dtype(np.float16), pooling.FLOAT16_MAX),
    "bfloat16": (np.dtype(ml_dtypes.bfloat16), pooling.BFLOAT16_MAX),
}


@dataclasses.dataclass
class Activations:
  """Embedding activations of one batch, in the wire dtype.

  Attributes:
    values: feature name to [batch, dim] (pooled features) or
      [batch, max_len, dim] ("raw" features).
    masks: "raw" feature name to float32 [batch, max_len], 1 for real rows and
      0 for padding.
  """

  values: dict[str, np.ndarray]
  masks: dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class _FeatureLookup:
  """Inverse index and offsets of one feature of a looked-up batch, kept for `backward`."""

  spec: FeatureSpec
  inverse: np.ndarray  # int32 [n], row in the table's unique IDs of each kept ID.
  offsets: np.ndarray  # int64 [batch + 1], sample starts in `inverse`.
  output_shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class LookupContext:
  """State of one `EmbeddingWorker.lookup` call that `backward` consumes.

  Attributes:
    unique_ids: table name to its deduplicated uint64 [u] IDs of the batch.
    features: feature name to its inverse index and offsets.
    batch_size: samples in the batch.
  """

  unique_ids: dict[str, np.ndarray]
  features: dict[str, _FeatureLookup]
  batch_size: int


class EmbeddingWorker:
  """Deduplicates, looks up and pools embeddings, and turns activation gradients into table gradients.

  Args:
    features: the sparse features; several may share a table.
    stores: table name to its store (local `EmbeddingStore` or a remote shard).
    wire_dtype: dtype of activations sent to the dense side and of gradients
      received from it: "float32", "float16" or "bfloat16".
    buffer_pool: pool for lookup and gradient buffers; a private pool if None.
    dedup: "hash" (numba hash table, IDs in first-occurrence order) or "sort"
      (`np.unique`). Both give the same activations and gradients; "hash" is
      the default because it measured 3-7x faster on batches of 65,536 IDs
      (`experiments/benchmark_embedding.py`).
  """

  def __init__(self, features: Sequence[FeatureSpec],
               stores: Mapping[str, EmbeddingStoreAPI], *,
               wire_dtype: str = "float32",
               buffer_pool: BufferPool | None = None,
               dedup: str = "hash"):
    if wire_dtype not in WIRE_DTYPES:
      raise ValueError(
          f"wire_dtype must be one of {sorted(WIRE_DTYPES)}, got {wire_dtype!r}.")
    if dedup not in pooling.DEDUP_METHODS:
      raise ValueError(
          f"dedup must be one of {sorted(pooling.DEDUP_METHODS)}, got {dedup!r}.")
    self.features = {}
    for spec in features:
      if spec.name in self.features:
        raise ValueError(f"Duplicate feature name {spec.name!r}.")
      if spec.table not in stores:
        raise ValueError(
            f"Feature {spec.name!r} reads table {spec.table!r}, which has no store;"
            f" stores exist for tables {sorted(stores)}.")
      self.features[spec.name] = spec
    self.stores = dict(stores)
    self.wire_dtype = wire_dtype
    self._wire_np_dtype, self._clamp_limit = WIRE_DTYPES[wire_dtype]
    self.buffer_pool = buffer_pool if buffer_pool is not None else BufferPool()
    self._dedup = pooling.DEDUP_METHODS[dedup]
    # Table name to its features, in the order given.
    self._table_features: dict[str, list[FeatureSpec]] = collections.defaultdict(list)
    for spec in self.features.values():
      self._table_features[spec.table].append(spec)
    self._stats_lock = threading.Lock()
    self._stats = collections.Counter()

  # Forward.

  def output_dims(self) -> dict[str, int]:
    """Feature name to the width of its activation rows."""
    return {name: int(self.stores[spec.table].dim) for name, spec in self.features.items()}

  def lookup(self, sparse: Mapping[str, SparseInput], *,
             train: bool) -> tuple[Activations, LookupContext]:
    """Looks up and pools the embeddings of one batch.

    Args:
      sparse: feature name to its IDs; must contain exactly the worker's features,
        all with the same batch size.
      train: passed to the stores; True admits unseen IDs and refreshes rows.

    Returns:
      The activations in the wire dtype, and the context for `backward`.
    """
    self._check_feature_names(sorted(sparse), "sparse input")
    batch_size = None
    prepared = {}
    for name, spec in self.features.items():
      ids, offsets, batch = self._prepare_feature(spec, sparse[name])
      if batch_size is None:
        batch_size = batch
      elif batch != batch_size:
        raise ValueError(
            f"Feature {name!r} has batch size {batch}, but other features have"
            f" {batch_size}; every feature needs one lengths entry per sample.")
      prepared[name] = (ids, offsets)
    batch_size = batch_size or 0

    values, masks, unique_ids, lookups = {}, {}, {}, {}
    totals = collections.Counter()
    for table, specs in self._table_features.items():
      all_ids = [prepared[spec.name][0] for spec in specs]
      ids = all_ids[0] if len(all_ids) == 1 else np.concatenate(all_ids)
      unique, inverse = self._dedup(ids)
      store = self.stores[table]
      rows = self.buffer_pool.acquire((unique.shape[0], int(store.dim)), np.float32)
      if unique.shape[0]:
        store.lookup(unique, train=train, out=rows)
      unique_ids[table] = unique
      totals["ids"] += ids.shape[0]
      totals["unique_ids"] += unique.shape[0]

      start = 0
      for spec in specs:
        offsets = prepared[spec.name][1]
        count = int(offsets[-1])
        feature_inverse = inverse[start:start + count]
        start += count
        value, mask, clamped, nans = self._pool(spec, rows, feature_inverse, offsets)
        values[spec.name] = value
        if mask is not None:
          masks[spec.name] = mask
        totals["clamped_values"] += clamped
        totals["nan_values"] += nans
        lookups[spec.name] = _FeatureLookup(
            spec=spec, inverse=feature_inverse, offsets=offsets,
            output_shape=tuple(value.shape))

    totals["lookups"] = 1
    with self._stats_lock:
      self._stats.update(totals)
    context = LookupContext(unique_ids=unique_ids, features=lookups,
                            batch_size=batch_size)
    return Activations(values=values, masks=masks), context

  def _check_feature_names(self, names: Sequence[str], what: str) -> None:
    unknown = sorted(set(names) - set(self.features))
    if unknown:
      raise KeyError(
          f"{what} has unknown features {unknown}; the worker was built for"
          f" {sorted(self.features)}.")
    missing = sorted(set(self.features) - set(names))
    if missing:
      raise KeyError(f"{what} is missing features {missing}.")

  def _prepare_feature(self, spec: FeatureSpec,
                       sparse: SparseInput) -> tuple[np.ndarray, np.ndarray, int]:
    """Validates one feature's input; returns the IDs to look up, their offsets and the batch size."""
    ids = np.asarray(sparse.ids)
    lengths = np.asarray(sparse.lengths)
    if ids.ndim != 1 or lengths.ndim != 1:
      raise ValueError(
          f"Feature {spec.name!r}: ids and lengths must be 1-D, got shapes"
          f" {ids.shape} and {lengths.shape}.")
    if ids.dtype != np.uint64:
      raise TypeError(f"Feature {spec.name!r}: ids must be uint64, got {ids.dtype}.")
    if not np.issubdtype(lengths.dtype, np.integer):
      raise TypeError(
          f"Feature {spec.name!r}: lengths must be integers, got {lengths.dtype}.")
    if lengths.shape[0] and lengths.min() < 0:
      sample = int(np.argmax(lengths < 0))
      raise ValueError(
          f"Feature {spec.name!r}: sample {sample} has negative length"
          f" {int(lengths[sample])}.")
    total = int(lengths.sum(dtype=np.int64))
    if total != ids.shape[0]:
      raise ValueError(
          f"Feature {spec.name!r}: lengths sum to {total} but there are"
          f" {ids.shape[0]} ids; lengths must count the ids of each sample.")
    batch = lengths.shape[0]

    if spec.pooling == "none":
      bad = np.flatnonzero(lengths != 1)
      if bad.size:
        sample = int(bad[0])
        raise ValueError(
            f"Feature {spec.name!r} has pooling 'none' and needs exactly one ID per"
            f" sample, but sample {sample} has {int(lengths[sample])} IDs"
            f" ({bad.size} samples differ). Use pooling 'sum', 'mean' or 'sqrtn'"
            " for multi-valued features.")
    if spec.pooling == "raw" and batch and int(lengths.max()) > spec.max_len:
      # Truncated IDs are never looked up, so they are not admitted into the
      # store and get no gradient.
      keep, offsets = pooling.truncate_positions(lengths, spec.max_len)
      return ids[keep], offsets, batch

    offsets = np.zeros(batch + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return ids, offsets, batch

  def _pool(self, spec: FeatureSpec, rows: np.ndarray, inverse: np.ndarray,
            offsets: np.ndarray):
    """Pools one feature; returns (value in wire dtype, mask or None, clamped, nans)."""
    batch = offsets.shape[0] - 1
    dim = rows.shape[1]
    limit = self._clamp_limit
    mask = None
    if spec.pooling == "raw":
      pooled = self.buffer_pool.acquire((batch, spec.max_len, dim), np.float32)
      mask = self.buffer_pool.acquire((batch, spec.max_len), np.float32)
      clamped, nans = pooling.pool_raw_forward(rows, inverse, offsets, limit, pooled, mask)
    else:
      pooled = self.buffer_pool.acquire((batch, dim), np.float32)
      mode = pooling.POOLING_MODES[spec.pooling]
      clamped, nans = pooling.pool_forward(rows, inverse, offsets, mode, limit, pooled)
    if self._wire_np_dtype == np.float32:
      return pooled, mask, clamped, nans
    value = self.buffer_pool.acquire(pooled.shape, self._wire_np_dtype)
    np.copyto(value, pooled, casting="unsafe")
    return value, mask, clamped, nans

  # Backward.

  def backward(self, ctx: LookupContext,
               grads: Mapping[str, Any]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Turns activation gradients into one summed gradient per unique ID and table.

    Args:
      ctx: the context `lookup` returned for this batch.
      grads: feature name to the gradient of its activation, same shape as
        `Activations.values[name]`, any float dtype (numpy or JAX array).

    Returns:
      Table name to (uint64 [u] unique IDs, float32 [u, dim] gradients). An ID
      dropped by the `max_len` of a "raw" feature does not occur.
    """
    self._check_feature_names(sorted(grads), "grads")
    result = {}
    nonfinite = 0
    for table, specs in self._table_features.items():
      unique = ctx.unique_ids[table]
      dim = int(self.stores[table].dim)
      table_grads = self.buffer_pool.acquire((unique.shape[0], dim), np.float32)
      table_grads.fill(0.0)
      for spec in specs:
        lookup = ctx.features[spec.name]
        grad = np.asarray(grads[spec.name])
        if tuple(grad.shape) != lookup.output_shape:
          raise ValueError(
              f"Feature {spec.name!r}: gradient has shape {tuple(grad.shape)} but the"
              f" activation has shape {lookup.output_shape}.")
        if not np.issubdtype(grad.dtype, np.floating) and grad.dtype != ml_dtypes.bfloat16:
          raise TypeError(
              f"Feature {spec.name!r}: gradient must be a float array, got {grad.dtype}.")
        grad = np.ascontiguousarray(grad, dtype=np.float32)
        if spec.pooling == "raw":
          nonfinite += pooling.pool_raw_backward(
              grad, lookup.inverse, lookup.offsets, table_grads)
        else:
          nonfinite += pooling.pool_backward(
              grad, lookup.inverse, lookup.offsets,
              pooling.POOLING_MODES[spec.pooling], table_grads)
      result[table] = (unique, table_grads)
    with self._stats_lock:
      self._stats["backwards"] += 1
      self._stats["nonfinite_gradients"] += nonfinite
    return result

  def apply(self, table_grads: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Sends each table's (ids, gradients) from `backward` to its store."""
    unknown = sorted(set(table_grads) - set(self.stores))
    if unknown:
      raise KeyError(
          f"Gradients for tables {unknown} have no store; stores exist for"
          f" {sorted(self.stores)}.")
    for table, (ids, grads) in table_grads.items():
      if ids.shape[0]:
        self.stores[table].apply_gradients(ids, grads)

  def stats(self) -> dict[str, Any]:
    """Counters since construction.

    Keys: lookups (batches), ids (IDs looked up after truncation), unique_ids,
    unique_ratio (unique_ids / ids), clamped_values and nan_values (activation
    values clamped for the wire dtype, or NaN), backwards, nonfinite_gradients
    (non-finite incoming gradient values), buffers (`BufferPool.stats()`).
    """
    with self._stats_lock:
      stats = {key: int(self._stats.get(key, 0)) for key in (
          "lookups", "ids", "unique_ids", "clamped_values", "nan_values",
          "backwards", "nonfinite_gradients")}
    stats["unique_ratio"] = stats["unique_ids"] / stats["ids"] if stats["ids"] else 0.0
    stats["buffers"] = self.buffer_pool.stats()
    return stats
