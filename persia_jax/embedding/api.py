"""The interface every embedding store implements, local or remote.

The trainer and the embedding worker only call these methods, so a parameter
server shard that lives in another process (for example a Ray actor) can take
the place of the in-process store.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np


class EmbeddingStoreAPI(Protocol):
  """A table of embedding rows keyed by uint64 IDs, with a sparse optimizer."""

  dim: int

  def lookup(self, ids: np.ndarray, *, train: bool = True,
             out: np.ndarray | None = None) -> np.ndarray:
    """Gathers float32 [len(ids), dim] rows for uint64 [n] `ids`.

    Duplicates get one row each. With `train=True` unknown IDs are admitted and
    inserted and lookups refresh recency; a call never evicts a row it reads.
    With `train=False` nothing is inserted or refreshed.
    """

  def apply_gradients(self, ids: np.ndarray, grads: np.ndarray) -> None:
    """Sums float32 [n, dim] `grads` over duplicate `ids`, then updates each row once."""

  def stats(self) -> dict[str, int | None]:
    """Counters such as hits, misses, inserts and evictions; "capacity" is None if unlimited."""

  def save(self, path: str) -> None:
    """Writes all shards with optimizer state to `path` atomically."""

  def restore(self, path: str) -> None:
    """Replaces the contents with the checkpoint at `path`."""

  def state_spec(self) -> dict[str, Any]:
    """JSON-serializable description (dim, optimizer, ...) used to validate checkpoints."""
