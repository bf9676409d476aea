"""Atomic TensorStore checkpoints of an `EmbeddingStore`.

Layout of a checkpoint directory `path`:

  path/manifest.json            the commit record (JSON): format and version,
                                `state_spec()`, rows per shard, counters, and
                                the name of the live data directory
  path/data-<token>/distinct    zarr uint8 [4096], distinct-ID registers
  path/data-<token>/shard_00003/keys    zarr uint64 [r]
  path/data-<token>/shard_00003/rows    zarr float32 [r, dim]
  path/data-<token>/shard_00003/state   zarr float32 [r, slot_width]

Rows of each shard are stored from least to most recently used, or in
insertion order for a store without capacity (which tracks no recency). Arrays
are written with TensorStore's zarr driver on the local file system; nothing
is pickled.

Atomic commit. `save` writes a temporary sibling `path/.tmp-data-<token>`,
fsyncs every file and directory in it, renames it to `path/data-<token>`, then
writes `manifest.json` through a temporary file, fsync and `os.replace`. Only
that last rename switches the checkpoint, so a save that fails or is killed at
any earlier point leaves the previous manifest and the data it names intact.
Older data directories and leftovers of failed saves are deleted after the
commit. Two saves to the same path at the same time are not supported.

Re-sharding. `load(path, num_shards=k)` routes every saved row to its shard
under k shards, so each ID keeps its exact row and optimizer state. With the
same shard count each shard gets back its rows in saved order, which rebuilds
its exact LRU order. With another shard count the rows of the old shards are
merged by their relative recency rank (position / rows in the old shard),
which approximates the global order because the shards' clocks are not
comparable. If a shard receives more rows than its capacity, its least
recently used rows are dropped, and a warning logs how many.

Not restored:
  * The admission sketch (pending occurrence counts of IDs not yet admitted):
    it is an approximate, decaying filter, and its counters depend on the
    shard layout. After a restore such IDs need `admission_min_count` fresh
    occurrences again.
  * With `restore`, the store keeps its own hyperparameters, seed and
    capacity, because restoring with a changed learning rate is legitimate.
    Only dim and optimizer name must match. `load` takes everything from the
    manifest except the shard count.
Counters are restored as totals (kept in shard 0) and the distinct-ID
registers as their union over shards.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from typing import TYPE_CHECKING, Any

from absl import logging
import numpy as np
import tensorstore as ts

from persia_jax.embedding import kernels

if TYPE_CHECKING:
  from persia_jax.embedding.store import EmbeddingStore

FORMAT = "persia_jax.embedding_store"
VERSION = 1
MANIFEST = "manifest.json"
_DATA_PREFIX = "data-"
_TEMP_PREFIX = ".tmp-"
_CHUNK_BYTES = 16 << 20  # Rows per zarr chunk are chosen to make chunks about this big.


# ----------------------------------------------------------------------------
# Low-level I/O.
# ----------------------------------------------------------------------------


def _zarr_spec(path: str) -> dict[str, Any]:
  return {"driver": "zarr", "kvstore": {"driver": "file", "path": path}}


def _write_array(path: str, array: np.ndarray) -> ts.Future:
  """Starts writing `array` as a new zarr array at `path`; returns the write future."""
  row_bytes = max(1, array.itemsize * int(np.prod(array.shape[1:], dtype=np.int64)))
  chunk_rows = int(max(1, min(array.shape[0], _CHUNK_BYTES // row_bytes)))
  chunk_shape = [chunk_rows] + [max(1, d) for d in array.shape[1:]]
  store = ts.open(
      _zarr_spec(path), create=True, dtype=ts.dtype(array.dtype.name),
      shape=list(array.shape),
      chunk_layout=ts.ChunkLayout(chunk_shape=chunk_shape)).result()
  return store.write(array)


def _read_array(path: str, dtype: np.dtype) -> np.ndarray:
  try:
    store = ts.open(_zarr_spec(path), open=True).result()
  except ValueError as error:
    raise FileNotFoundError(
        f"Checkpoint array {path} is missing or unreadable: {error}") from error
  array = store.read().result()
  if array.dtype != dtype:
    raise ValueError(f"Checkpoint array {path} has dtype {array.dtype}, expected {dtype}.")
  return np.ascontiguousarray(array)


def _fsync_path(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _fsync_tree(root: str) -> None:
  for directory, _, files in os.walk(root, topdown=False):
    for file_name in files:
      _fsync_path(os.path.join(directory, file_name))
    _fsync_path(directory)


def _shard_dir(data_dir: str, shard: int) -> str:
  return os.path.join(data_dir, f"shard_{shard:05d}")


# ----------------------------------------------------------------------------
# Save.
# ----------------------------------------------------------------------------


def save(store: "EmbeddingStore", path: str) -> None:
  """Writes `store` to the checkpoint directory `path` atomically (see module docstring)."""
  path = os.path.abspath(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise NotADirectoryError(
        f"Checkpoint path {path} exists and is not a directory; choose another path.")
  os.makedirs(path, exist_ok=True)

  shards = store.export_shards()
  counters, registers = store.export_counters()

  token = uuid.uuid4().hex
  data_name = _DATA_PREFIX + token
  temp_dir = os.path.join(path, _TEMP_PREFIX + data_name)
  os.makedirs(temp_dir)
  writes = [_write_array(os.path.join(temp_dir, "distinct"), registers)]
  for index, shard in enumerate(shards):
    shard_dir = _shard_dir(temp_dir, index)
    for array_name in ("keys", "rows", "state"):
      writes.append(_write_array(os.path.join(shard_dir, array_name), shard[array_name]))
  for write in writes:
    write.result()
  _fsync_tree(temp_dir)
  os.rename(temp_dir, os.path.join(path, data_name))
  _fsync_path(path)

  manifest = {
      "format": FORMAT,
      "version": VERSION,
      "data": data_name,
      "state_spec": store.state_spec(),
      "rows_per_shard": [int(shard["keys"].shape[0]) for shard in shards],
      "counters": counters,
  }
  manifest_temp = os.path.join(path, f"{_TEMP_PREFIX}{token}-{MANIFEST}")
  with open(manifest_temp, "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=2, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(manifest_temp, os.path.join(path, MANIFEST))
  _fsync_path(path)

  # The new manifest is durable, so older data and failed-save leftovers can go.
  for entry in os.listdir(path):
    if entry == data_name or not (entry.startswith(_DATA_PREFIX) or
                                  entry.startswith(_TEMP_PREFIX)):
      continue
    stale = os.path.join(path, entry)
    if os.path.isdir(stale):
      shutil.rmtree(stale, ignore_errors=True)
    else:
      os.remove(stale)
  logging.info("Saved embedding table %r (%d rows, %d shards) to %s.", store.name,
               sum(manifest["rows_per_shard"]), len(shards), path)


# ----------------------------------------------------------------------------
# Read, restore and load.
# ----------------------------------------------------------------------------


def read_manifest(path: str) -> dict[str, Any]:
  """Returns the parsed manifest of the checkpoint at `path`.

  Raises:
    FileNotFoundError: if `path` contains no committed checkpoint.
    ValueError: if the manifest is not a valid embedding-store manifest.
  """
  manifest_path = os.path.join(os.path.abspath(path), MANIFEST)
  if not os.path.isfile(manifest_path):
    raise FileNotFoundError(
        f"No embedding checkpoint at {path}: {manifest_path} does not exist.")
  with open(manifest_path, encoding="utf-8") as f:
    try:
      manifest = json.load(f)
    except json.JSONDecodeError as error:
      raise ValueError(
          f"Invalid checkpoint manifest {manifest_path}, line {error.lineno}, column"
          f" {error.colno}: {error.msg}.") from error
  if manifest.get("format") != FORMAT:
    raise ValueError(
        f"{manifest_path} has format {manifest.get('format')!r}, expected {FORMAT!r}.")
  if manifest.get("version") != VERSION:
    raise ValueError(
        f"{manifest_path} has version {manifest.get('version')!r}; this code reads"
        f" version {VERSION}.")
  return manifest


def read_rows(path: str, manifest: dict[str, Any] | None = None,
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Reads all rows, ordered from least to most recently used.

  Rows of several shards are merged by relative recency rank (see module
  docstring), which keeps the saved order when there is one shard.

  Returns:
    uint64 [r] keys, float32 [r, dim] rows and float32 [r, slot_width] state.
  """
  path = os.path.abspath(path)
  manifest = read_manifest(path) if manifest is None else manifest
  spec = manifest["state_spec"]
  data_dir = os.path.join(path, manifest["data"])
  keys, rows, state, ranks = [], [], [], []
  for index, expected in enumerate(manifest["rows_per_shard"]):
    shard_dir = _shard_dir(data_dir, index)
    shard_keys = _read_array(os.path.join(shard_dir, "keys"), np.dtype(np.uint64))
    shard_rows = _read_array(os.path.join(shard_dir, "rows"), np.dtype(np.float32))
    shard_state = _read_array(os.path.join(shard_dir, "state"), np.dtype(np.float32))
    shapes = (shard_keys.shape, shard_rows.shape, shard_state.shape)
    if shapes != ((expected,), (expected, spec["dim"]), (expected, spec["slot_width"])):
      raise ValueError(
          f"Checkpoint shard {shard_dir} has arrays of shapes {shapes}; the manifest"
          f" expects {expected} rows of dim {spec['dim']} and slot width"
          f" {spec['slot_width']}.")
    keys.append(shard_keys)
    rows.append(shard_rows)
    state.append(shard_state)
    ranks.append((np.arange(expected, dtype=np.float64) + 1.0) / max(expected, 1))
  order = np.argsort(np.concatenate(ranks), kind="stable")
  return (np.concatenate(keys)[order], np.concatenate(rows)[order],
          np.concatenate(state)[order])


def _check_compatible(store: "EmbeddingStore", spec: dict[str, Any], path: str) -> None:
  if spec["dim"] != store.dim:
    raise ValueError(
        f"Cannot restore checkpoint {path} with dim={spec['dim']} into embedding"
        f" table {store.name!r} with dim={store.dim}.")
  saved_optimizer = spec["optimizer"]["name"]
  if saved_optimizer != store.optimizer.name:
    raise ValueError(
        f"Cannot restore checkpoint {path} with optimizer {saved_optimizer!r} into"
        f" embedding table {store.name!r} with optimizer {store.optimizer.name!r}: their"
        " per-row states differ.")
  if spec["optimizer"] != store.optimizer.to_dict():
    logging.info("Restoring %s into %r: keeping the store's optimizer settings %s"
                 " instead of the saved %s.", path, store.name,
                 store.optimizer.to_dict(), spec["optimizer"])
  if spec["seed"] != store.seed or spec["init_scale"] != store.init_scale:
    logging.warning(
        "Restoring %s into %r: the saved seed=%d, init_scale=%g differ from the store's"
        " seed=%d, init_scale=%g, so new rows get other initial values than in the"
        " saved run.", path, store.name, spec["seed"], spec["init_scale"], store.seed,
        store.init_scale)


def _fill(store: "EmbeddingStore", path: str, manifest: dict[str, Any]) -> None:
  keys, rows, state = read_rows(path, manifest)
  distinct = _read_array(os.path.join(os.path.abspath(path), manifest["data"], "distinct"),
                         np.dtype(np.uint8))
  if distinct.shape != (kernels.DISTINCT_REGISTERS,):
    raise ValueError(
        f"Checkpoint {path} has {distinct.shape} distinct-ID registers, expected"
        f" ({kernels.DISTINCT_REGISTERS},).")
  store.import_rows(keys, rows, state, counters=manifest["counters"],
                    distinct_registers=distinct)
  dropped = keys.shape[0] - len(store)
  if dropped:
    logging.warning(
        "Loading %s into %r with %d shards of capacity %s dropped the %d least recently"
        " used rows that did not fit their shard.", path, store.name, store.num_shards,
        store.capacity, dropped)


def restore(store: "EmbeddingStore", path: str) -> None:
  """Replaces the contents of `store` with the checkpoint at `path`."""
  manifest = read_manifest(path)
  _check_compatible(store, manifest["state_spec"], path)
  _fill(store, path, manifest)
  logging.info("Restored embedding table %r (%d rows) from %s.", store.name, len(store),
               path)


def load(store_class: type["EmbeddingStore"], path: str, *,
         num_shards: int | None = None, num_threads: int = 1) -> "EmbeddingStore":
  """Creates a store configured and filled from the checkpoint at `path`."""
  manifest = read_manifest(path)
  store = store_class.from_state_spec(manifest["state_spec"], num_shards=num_shards,
                                      num_threads=num_threads)
  _fill(store, path, manifest)
  return store
