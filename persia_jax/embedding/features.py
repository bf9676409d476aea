"""Embedding tables and the sparse features that read them.

A table is one ID space backed by one embedding store. Several features may
share a table (for example "user_id" and "clicked_by_user_id"), in which case
an ID means the same row in both, and the embedding worker deduplicates their
IDs together.

Configs describe both in two mappings, keyed by name:

    config.tables = {"user": {"dim": 16, "optimizer": {"name": "adagrad",
                                                       "learning_rate": 0.05}}}
    config.features = {"user_id": {"table": "user", "pooling": "none"},
                       "history": {"table": "user", "pooling": "raw",
                                   "max_len": 20}}

Optional keys: `table_defaults` gives fields shared by every table.
`default_table` names the table of features that set no `table`; without it
such a feature reads the table named like the feature. `default_pooling` is
the pooling of features that set none. Other keys (such as `wire_dtype`) are
ignored here.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

POOLINGS = ("none", "sum", "mean", "sqrtn", "raw")


@dataclasses.dataclass(frozen=True)
class TableSpec:
  """One embedding table, stored in one `EmbeddingStore`.

  Attributes:
    name: table name, unique in a model.
    dim: row width (float32 values).
    optimizer: `OptimizerSpec` fields as a dict, for example
      {"name": "adagrad", "learning_rate": 0.05}; None uses the store default.
    capacity: maximum rows kept; None or 0 means unbounded (0 is stored as None).
    num_shards: shards of the store, each guarded by its own lock.
    init_scale: new rows are drawn uniformly from [-init_scale, init_scale].
    admission_probability: probability that an unseen ID gets a row.
    admission_min_count: times an ID must be seen before it gets a row.
    unknown_id: what a lookup of a not-admitted ID returns, as the store
      defines it ("initial" returns a fresh initial row without storing it).
  """

  name: str
  dim: int
  optimizer: Mapping[str, Any] | None = None
  capacity: int | None = None
  num_shards: int = 4
  init_scale: float = 0.01
  admission_probability: float = 1.0
  admission_min_count: int = 1
  unknown_id: str = "initial"

  def __post_init__(self):
    if not self.name:
      raise ValueError("TableSpec.name must be a non-empty string.")
    if self.capacity == 0:
      # Configs write 0 for "unbounded" because ConfigDict fields keep one type.
      object.__setattr__(self, "capacity", None)
    if int(self.dim) <= 0:
      raise ValueError(f"Table {self.name!r}: dim must be positive, got {self.dim}.")
    if int(self.num_shards) <= 0:
      raise ValueError(
          f"Table {self.name!r}: num_shards must be positive, got {self.num_shards}.")
    if self.capacity is not None and int(self.capacity) <= 0:
      raise ValueError(
          f"Table {self.name!r}: capacity must be positive or None, got {self.capacity}.")
    if self.optimizer is not None and not isinstance(self.optimizer, Mapping):
      raise TypeError(
          f"Table {self.name!r}: optimizer must be a dict of OptimizerSpec fields,"
          f" got {type(self.optimizer).__name__}.")


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
  """One sparse input feature and how its IDs become an activation.

  Attributes:
    name: feature name, the key in `Batch.sparse`.
    table: name of the table the IDs index.
    pooling: "none" (exactly one ID per sample, output [batch, dim]), "sum",
      "mean", "sqrtn" (sum / sqrt(len)), all [batch, dim], or "raw" (the first
      `max_len` rows, zero-padded, [batch, max_len, dim] with a mask).
    max_len: IDs kept per sample for "raw" pooling; must be 0 otherwise.
  """

  name: str
  table: str
  pooling: str = "sum"
  max_len: int = 0

  def __post_init__(self):
    if not self.name:
      raise ValueError("FeatureSpec.name must be a non-empty string.")
    if self.pooling not in POOLINGS:
      raise ValueError(
          f"Feature {self.name!r}: pooling must be one of {POOLINGS}, got {self.pooling!r}.")
    if self.pooling == "raw" and int(self.max_len) <= 0:
      raise ValueError(
          f"Feature {self.name!r}: pooling 'raw' needs max_len > 0, got {self.max_len}.")
    if self.pooling != "raw" and self.max_len != 0:
      raise ValueError(
          f"Feature {self.name!r}: max_len applies only to pooling 'raw'; got max_len="
          f"{self.max_len} with pooling {self.pooling!r}. Remove max_len or use 'raw'.")


def _to_dict(value: Any) -> Any:
  """Converts an ml_collections ConfigDict (or FrozenConfigDict) into plain dicts."""
  if hasattr(value, "to_dict"):
    return value.to_dict()
  return value


def _named_entries(section: Any, kind: str) -> list[tuple[str, dict[str, Any]]]:
  """Reads a name -> fields mapping, or a list of field dicts that each hold "name"."""
  section = _to_dict(section)
  if isinstance(section, Mapping):
    entries = []
    for name, fields in section.items():
      fields = dict(_to_dict(fields))
      if "name" in fields and fields["name"] != name:
        raise ValueError(
            f"{kind} {name!r} sets name={fields['name']!r}; omit the name field or make"
            " it equal to the key.")
      fields.pop("name", None)
      entries.append((str(name), fields))
    return entries
  if isinstance(section, Sequence) and not isinstance(section, str):
    entries = []
    for index, fields in enumerate(section):
      fields = dict(_to_dict(fields))
      if "name" not in fields:
        raise ValueError(f"{kind} entry {index} has no 'name' field.")
      name = str(fields.pop("name"))
      entries.append((name, fields))
    return entries
  raise TypeError(
      f"config {kind.lower()}s must be a mapping from name to fields or a list of"
      f" dicts, got {type(section).__name__}.")


def _build(cls, name: str, fields: dict[str, Any], kind: str):
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(
        f"{kind} {name!r} has unknown fields {unknown}; valid fields are"
        f" {sorted(known - {'name'})}.")
  return cls(name=name, **fields)


def specs_from_config(config: Any) -> tuple[list[TableSpec], list[FeatureSpec]]:
  """Builds table and feature specs from a config (ConfigDict or dict).

  Args:
    config: contains `tables` and `features` (see the module docstring), either at
      the top level or under `config.embedding`.

  Returns:
    (tables, features) in config order.

  Raises:
    ValueError: on unknown fields, duplicate names or a feature whose table
      is not defined.
  """
  config = _to_dict(config)
  if "tables" not in config and "embedding" in config:
    config = _to_dict(config["embedding"])
  for key in ("tables", "features"):
    if key not in config:
      raise ValueError(f"config has no '{key}' entry; found keys {sorted(config)}.")
  defaults = dict(_to_dict(config.get("table_defaults", None) or {}))

  tables = []
  for name, fields in _named_entries(config["tables"], "Table"):
    merged = {**defaults, **fields}
    tables.append(_build(TableSpec, name, merged, "Table"))

  default_table = config.get("default_table") or None
  default_pooling = config.get("default_pooling") or None
  features = []
  for name, fields in _named_entries(config["features"], "Feature"):
    if not fields.get("table"):
      fields["table"] = default_table or name
    if default_pooling and not fields.get("pooling"):
      fields["pooling"] = default_pooling
    features.append(_build(FeatureSpec, name, fields, "Feature"))

  validate_specs(tables, features)
  return tables, features


def validate_specs(tables: Sequence[TableSpec], features: Sequence[FeatureSpec]) -> None:
  """Raises ValueError on duplicate names or features that read an undefined table."""
  table_names = [t.name for t in tables]
  duplicates = sorted({n for n in table_names if table_names.count(n) > 1})
  if duplicates:
    raise ValueError(f"Duplicate table names: {duplicates}.")
  feature_names = [f.name for f in features]
  duplicates = sorted({n for n in feature_names if feature_names.count(n) > 1})
  if duplicates:
    raise ValueError(f"Duplicate feature names: {duplicates}.")
  for feature in features:
    if feature.table not in table_names:
      raise ValueError(
          f"Feature {feature.name!r} reads table {feature.table!r}, which is not"
          f" defined; defined tables are {table_names}.")


def table_seed(seed: int, table_name: str) -> int:
  """Derives a per-table seed that does not depend on the order of the tables."""
  return (int(seed) * 1_000_003 + zlib.crc32(table_name.encode())) % (2**31 - 1)


def build_stores(tables: Sequence[TableSpec], *, seed: int) -> dict[str, Any]:
  """Creates one `EmbeddingStore` per table.

  Args:
    tables: table specs.
    seed: base seed; each table gets `table_seed(seed, name)`.

  Returns:
    Table name to its store.
  """
  # Imported here so that specs can be parsed without the store's numba kernels.
  from persia_jax.embedding import store as store_lib  # pylint: disable=g-import-not-at-top

  stores = {}
  for spec in tables:
    if spec.name in stores:
      raise ValueError(f"Duplicate table name {spec.name!r}.")
    stores[spec.name] = store_lib.EmbeddingStore(
        spec.dim,
        num_shards=spec.num_shards,
        capacity=spec.capacity,
        optimizer=None if spec.optimizer is None else dict(spec.optimizer),
        init_scale=spec.init_scale,
        seed=table_seed(seed, spec.name),
        admission_probability=spec.admission_probability,
        admission_min_count=spec.admission_min_count,
        unknown_id=spec.unknown_id,
        name=spec.name,
    )
  return stores


def load_stores(tables: Sequence[TableSpec], path: str) -> dict[str, Any]:
  """Loads one `EmbeddingStore` per table from `path/<table name>`.

  Each store keeps the seed, optimizer and contents of its checkpoint, and is
  re-sharded to the spec's `num_shards`.

  Raises:
    FileNotFoundError: if a table has no checkpoint under `path`.
    ValueError: if a checkpoint's dim differs from its table spec.
  """
  from persia_jax.embedding import store as store_lib  # pylint: disable=g-import-not-at-top

  stores = {}
  for spec in tables:
    table_path = os.path.join(path, spec.name)
    if not os.path.exists(table_path):
      raise FileNotFoundError(
          f"No checkpoint for table {spec.name!r} at {table_path}; the saved tables"
          f" are {sorted(os.listdir(path)) if os.path.isdir(path) else 'none'}.")
    store = store_lib.EmbeddingStore.load(table_path, num_shards=spec.num_shards)
    if store.dim != spec.dim:
      raise ValueError(
          f"Table {spec.name!r}: the checkpoint at {table_path} has dim {store.dim}"
          f" but the config sets dim {spec.dim}.")
    stores[spec.name] = store
  return stores
