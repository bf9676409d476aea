"""The batch format shared by every data source, the embedding worker and the trainer."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class SparseInput:
  """Variable-length feature IDs of one sparse feature for a batch.

  Attributes:
    ids: uint64 [total_ids], the IDs of all samples concatenated in sample order.
    lengths: int32 [batch], the number of IDs of each sample; `lengths.sum()`
      equals `len(ids)`. A one-hot feature has every length equal to 1.
  """

  ids: np.ndarray
  lengths: np.ndarray

  def __post_init__(self):
    if self.ids.dtype != np.uint64:
      raise TypeError(f"SparseInput.ids must be uint64, got {self.ids.dtype}.")
    if self.ids.ndim != 1 or self.lengths.ndim != 1:
      raise ValueError(
          f"SparseInput.ids and lengths must be 1-D, got shapes {self.ids.shape}"
          f" and {self.lengths.shape}.")
    total = int(self.lengths.sum())
    if total != self.ids.shape[0]:
      raise ValueError(
          f"SparseInput.lengths sum to {total} but there are {self.ids.shape[0]}"
          " ids; lengths must count the ids of each sample.")

  @classmethod
  def one_hot(cls, ids: np.ndarray) -> "SparseInput":
    """Wraps uint64 [batch] IDs, one per sample."""
    ids = np.ascontiguousarray(ids, dtype=np.uint64)
    return cls(ids=ids, lengths=np.ones(ids.shape[0], np.int32))

  @property
  def offsets(self) -> np.ndarray:
    """int64 [batch + 1] start offsets of each sample's IDs in `ids`."""
    offsets = np.zeros(self.lengths.shape[0] + 1, np.int64)
    np.cumsum(self.lengths, out=offsets[1:])
    return offsets


@dataclasses.dataclass
class Batch:
  """One batch of labelled samples.

  Attributes:
    labels: float32 [batch], 0 or 1.
    dense: float32 [batch, num_dense] transformed numeric features.
    sparse: feature name to its IDs.
    weights: float32 [batch], 1 for real samples and 0 for padding, so a padded
      batch gives the same loss and metrics as the unpadded one.
  """

  labels: np.ndarray
  dense: np.ndarray
  sparse: dict[str, SparseInput]
  weights: np.ndarray | None = None

  def __post_init__(self):
    if self.weights is None:
      self.weights = np.ones(self.labels.shape[0], np.float32)

  @property
  def size(self) -> int:
    return int(self.labels.shape[0])
