"""The feature schema that every data source reads through.

A data config lists its features once; readers, the embedding side and the
model all take names, kinds, tables and pooling modes from the same `Schema`.

Feature kinds:
  categorical: one ID per sample, `feature_id(name, field text)`.
  multi_value: several IDs per sample, the field split at `delimiter`.
  dense: one float32 value per sample after `transform`.

Dense transforms:
  signed_log1p: x > 0 -> log(1 + x); x <= 0 -> -log(1 - x), so negative
    integers stay distinct from positive ones.
  identity: x unchanged.
A missing dense value becomes 0 after the transform. With
`missing_indicator=True` every dense feature also gets a column
"<name>_missing" that is 1 where the value was missing.

Categorical transforms (applied to an integer column before hashing):
  hour_of_day, day_of_week: from an Avazu-style YYMMDDHH integer (day 0 is
  Monday).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

KINDS = ("categorical", "multi_value", "dense")
DENSE_TRANSFORMS = ("signed_log1p", "identity")
CATEGORICAL_TRANSFORMS = (None, "hour_of_day", "day_of_week")
POOLINGS = ("none", "sum", "mean", "sqrtn")


@dataclasses.dataclass(frozen=True)
class SparseColumn:
  """A categorical or multi-value feature.

  Attributes:
    name: feature name; also the key of `Batch.sparse` and the hash prefix.
    kind: "categorical" or "multi_value".
    column: source column (a file column name, or for libsvm the field
      number as text).
    delimiter: token separator of a multi-value field.
    table: embedding table the IDs look up; features may share a table.
    pooling: how the embedding side reduces a sample's rows: "none" (exactly
      one ID), "sum", "mean" or "sqrtn".
    transform: None, "hour_of_day" or "day_of_week".
    empty_as_missing: for multi_value, whether an empty field gives one ID
      (the hash of the empty string) instead of no IDs.
  """

  name: str
  kind: str
  column: str
  delimiter: str | None = None
  table: str | None = None
  pooling: str = "none"
  transform: str | None = None
  empty_as_missing: bool = True


@dataclasses.dataclass(frozen=True)
class DenseColumn:
  """A numeric feature: `name`, source `column` and `transform`."""

  name: str
  column: str
  transform: str = "signed_log1p"


@dataclasses.dataclass(frozen=True)
class LabelColumn:
  """The label column; an empty `column` means unlabelled data (labels read as 0).

  With `positive_values` unset the field must parse as the number 0 or 1.
  Otherwise the field text must be one of `positive_values` (label 1) or
  `negative_values` (label 0); any other text is an invalid label.
  """

  column: str
  positive_values: tuple[str, ...] = ()
  negative_values: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Schema:
  """Label, dense and sparse features of a data source."""

  label: LabelColumn
  dense: tuple[DenseColumn, ...]
  sparse: tuple[SparseColumn, ...]
  missing_indicator: bool = False

  @property
  def dense_names(self) -> list[str]:
    names = [d.name for d in self.dense]
    if self.missing_indicator:
      names += [f"{d.name}_missing" for d in self.dense]
    return names

  @property
  def num_dense(self) -> int:
    return len(self.dense_names)

  @property
  def sparse_names(self) -> list[str]:
    return [s.name for s in self.sparse]

  def source_columns(self) -> list[str]:
    """Returns the distinct file columns the schema reads, label first."""
    columns = [self.label.column] if self.label.column else []
    for feature in (*self.dense, *self.sparse):
      if feature.column not in columns:
        columns.append(feature.column)
    return columns


def _get(entry: Any, key: str, default: Any = None) -> Any:
  if hasattr(entry, "get"):
    return entry.get(key, default)
  return getattr(entry, key, default)


def schema_from_config(data_config: Any) -> Schema:
  """Builds and validates the `Schema` of a data config.

  Args:
    data_config: a ConfigDict (or mapping) with `label` (column,
      positive_values, negative_values), `features` (a list of entries with
      name, kind, column and per kind delimiter, table, pooling, transform)
      and optionally `missing_indicator`.

  Raises:
    ValueError: naming the feature and the invalid field.
  """
  label_config = data_config.label
  label = LabelColumn(
      column=str(_get(label_config, "column") or ""),
      positive_values=tuple(_get(label_config, "positive_values") or ()),
      negative_values=tuple(_get(label_config, "negative_values") or ()))
  if bool(label.positive_values) != bool(label.negative_values):
    raise ValueError(
        "label.positive_values and label.negative_values must be set together;"
        f" got {label.positive_values!r} and {label.negative_values!r}.")

  dense, sparse, names = [], [], set()
  for entry in data_config.features:
    name = str(_get(entry, "name"))
    kind = _get(entry, "kind")
    column = str(_get(entry, "column") or name)
    if name in names:
      raise ValueError(f"Feature {name!r} is declared twice in data.features.")
    names.add(name)
    if kind not in KINDS:
      raise ValueError(f"Feature {name!r} has kind {kind!r}; expected one of {KINDS}.")
    if kind == "dense":
      transform = _get(entry, "transform") or "signed_log1p"
      if transform not in DENSE_TRANSFORMS:
        raise ValueError(
            f"Dense feature {name!r} has transform {transform!r}; expected one"
            f" of {DENSE_TRANSFORMS}.")
      dense.append(DenseColumn(name=name, column=column, transform=transform))
      continue
    delimiter = _get(entry, "delimiter")
    if kind == "multi_value" and (not delimiter or len(delimiter.encode()) != 1):
      raise ValueError(
          f"Multi-value feature {name!r} needs a one-character delimiter, got"
          f" {delimiter!r}.")
    default_pooling = "none" if kind == "categorical" else "sum"
    pooling = _get(entry, "pooling") or default_pooling
    if pooling not in POOLINGS:
      raise ValueError(f"Feature {name!r} has pooling {pooling!r}; expected one of {POOLINGS}.")
    transform = _get(entry, "transform")
    if transform not in CATEGORICAL_TRANSFORMS or (transform and kind != "categorical"):
      raise ValueError(
          f"Feature {name!r} of kind {kind!r} has transform {transform!r};"
          f" categorical features accept {CATEGORICAL_TRANSFORMS}.")
    empty_as_missing = _get(entry, "empty_as_missing")
    sparse.append(SparseColumn(
        name=name, kind=kind, column=column, delimiter=delimiter,
        table=_get(entry, "table") or name, pooling=pooling, transform=transform,
        empty_as_missing=True if empty_as_missing is None else bool(empty_as_missing)))
  return Schema(label=label, dense=tuple(dense), sparse=tuple(sparse),
                missing_indicator=bool(_get(data_config, "missing_indicator", False)))


def feature_entries(dense: Sequence[str] = (), categorical: Sequence[str] = (),
                    multi_value: Sequence[tuple[str, str]] = (),
                    transform: str = "signed_log1p") -> list[dict[str, Any]]:
  """Builds `data.features` entries for the common case of one feature per column.

  Args:
    dense: dense column names.
    categorical: categorical column names.
    multi_value: (column name, delimiter) pairs.
    transform: the transform of every dense feature.

  Returns:
    A list of dicts with name, kind, column and kind-specific fields.
  """
  entries = [dict(name=c, kind="dense", column=c, transform=transform) for c in dense]
  entries += [dict(name=c, kind="categorical", column=c, table=c, pooling="none")
              for c in categorical]
  entries += [dict(name=c, kind="multi_value", column=c, delimiter=d, table=c,
                   pooling="sum") for c, d in multi_value]
  return entries
