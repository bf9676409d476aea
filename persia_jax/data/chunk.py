"""Columnar row blocks between the readers and the batcher.

A `Chunk` contains parsed rows in the same layout as a `Batch`; the pipeline
concatenates, permutes and slices chunks into batches with vectorized numpy
gathers (no per-row Python work).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from persia_jax.data.batch import Batch, SparseInput


@dataclasses.dataclass
class Chunk:
  """Parsed rows.

  Attributes:
    labels: float32 [n].
    dense: float32 [n, num_dense].
    sparse: feature name to (ids uint64 [total], lengths int32 [n]).
  """

  labels: np.ndarray
  dense: np.ndarray
  sparse: dict[str, tuple[np.ndarray, np.ndarray]]

  @property
  def size(self) -> int:
    return int(self.labels.shape[0])

  def take(self, index: np.ndarray) -> "Chunk":
    """Returns the rows at int64 [m] positions `index`, in that order."""
    sparse = {}
    for name, (ids, lengths) in self.sparse.items():
      sparse[name] = _take_ragged(ids, lengths, index)
    return Chunk(self.labels[index], self.dense[index], sparse)

  def slice(self, start: int, stop: int) -> "Chunk":
    """Returns rows [start, stop) without copying the dense parts."""
    sparse = {}
    for name, (ids, lengths) in self.sparse.items():
      part = lengths[start:stop]
      if ids.shape[0] == lengths.shape[0] and bool(np.all(lengths == 1)):
        sparse[name] = (ids[start:stop], part)
        continue
      first = int(lengths[:start].sum())
      sparse[name] = (ids[first:first + int(part.sum())], part)
    return Chunk(self.labels[start:stop], self.dense[start:stop], sparse)

  def to_batch(self) -> Batch:
    sparse = {name: SparseInput(ids=np.ascontiguousarray(ids),
                                lengths=np.ascontiguousarray(lengths))
              for name, (ids, lengths) in self.sparse.items()}
    return Batch(labels=np.ascontiguousarray(self.labels),
                 dense=np.ascontiguousarray(self.dense), sparse=sparse)


def _take_ragged(ids: np.ndarray, lengths: np.ndarray, index: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
  new_lengths = lengths[index]
  if ids.shape[0] == lengths.shape[0] and bool(np.all(lengths == 1)):
    return ids[index], new_lengths
  offsets = np.zeros(lengths.shape[0] + 1, np.int64)
  np.cumsum(lengths, out=offsets[1:])
  total = int(new_lengths.sum())
  new_offsets = np.zeros(index.shape[0] + 1, np.int64)
  np.cumsum(new_lengths, out=new_offsets[1:])
  # Position j of the output reads ids[offsets[row] + (j - new_offsets[k])]
  # for the k-th selected row `row`.
  shift = np.repeat(offsets[index] - new_offsets[:-1], new_lengths)
  return ids[np.arange(total, dtype=np.int64) + shift], new_lengths


def concat_chunks(chunks: list[Chunk]) -> Chunk:
  """Concatenates chunks with the same features, in order."""
  if len(chunks) == 1:
    return chunks[0]
  first = chunks[0]
  sparse = {}
  for name in first.sparse:
    sparse[name] = (np.concatenate([c.sparse[name][0] for c in chunks]),
                    np.concatenate([c.sparse[name][1] for c in chunks]))
  return Chunk(np.concatenate([c.labels for c in chunks]),
               np.concatenate([c.dense for c in chunks]), sparse)


def empty_chunk(num_dense: int, sparse_names: list[str]) -> Chunk:
  return Chunk(np.zeros(0, np.float32), np.zeros((0, num_dense), np.float32),
               {name: (np.zeros(0, np.uint64), np.zeros(0, np.int32))
                for name in sparse_names})
