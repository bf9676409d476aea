"""Tests of training lookups whose rows change between resolution and use.

`kernels.lookup_train` resolves the rows of all IDs of a call before its main
loop, so that it can prefetch them. An insert earlier in that loop can evict a
resolved row and give its slot to another ID, or insert an ID that was absent
when resolved. These tests pin the results in both cases to what one lookup
per ID in arrival order gives.
"""

import numpy as np

from persia_jax.embedding.store import EmbeddingStore


def _ids(*values: int) -> np.ndarray:
  return np.array(values, np.uint64)


def _trained_store() -> EmbeddingStore:
  """A full 1-shard store (capacity 3) holding IDs 1, 2, 3 (1 least recent), 1 trained."""
  store = EmbeddingStore(2, num_shards=1, capacity=3,
                         optimizer={"name": "sgd", "learning_rate": 1.0})
  store.lookup(_ids(1, 2, 3))
  store.apply_gradients(_ids(1), np.ones((1, 2), np.float32))
  return store


def test_evicted_resolved_row_not_returned():
  store = _trained_store()
  # 4 misses and takes the row of 1, the least recently used. So 1 misses too
  # and gets its initial value, not the row that 4 now owns.
  out = store.lookup(_ids(4, 1))
  np.testing.assert_array_equal(out, store.initial_values(_ids(4, 1)))


def test_evicted_resolved_row_counts_miss():
  store = _trained_store()
  before = store.stats()
  store.lookup(_ids(4, 1))
  after = store.stats()
  assert after["misses"] - before["misses"] == 2
  assert after["hits"] - before["hits"] == 0
  assert after["evictions"] - before["evictions"] == 2


def test_evicted_resolved_row_keeps_lru_order():
  store = _trained_store()
  store.lookup(_ids(4, 1))  # Evicts 1, then 2.
  shard = store.export_shards()[0]
  assert shard["keys"].tolist() == [3, 4, 1]


def test_repeated_absent_id_hits_new_row():
  store = EmbeddingStore(2, num_shards=1, optimizer={"name": "sgd"})
  out = store.lookup(_ids(7, 7))
  np.testing.assert_array_equal(out, store.initial_values(_ids(7, 7)))
  stats = store.stats()
  assert stats["misses"] == 1
  assert stats["hits"] == 1
  assert stats["rows"] == 1
