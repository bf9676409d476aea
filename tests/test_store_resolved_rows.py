"""Tests of training lookups that both read present IDs and insert absent ones.

`kernels.lookup_train` first copies and refreshes every ID of a call that has
a row, then inserts the absent ones. So an insert never evicts a row the same
call reads, and evictions take the least recently used row the call does not
touch, also when the eviction buffer is refilled in the middle of a call.
"""

import numpy as np

from persia_jax.embedding.store import EmbeddingStore
from tests import numpy_reference


def _ids(*values: int) -> np.ndarray:
  return np.array(values, np.uint64)


def _trained_store() -> EmbeddingStore:
  """A full 1-shard store (capacity 3) holding IDs 1, 2, 3 (1 least recent), 1 trained."""
  store = EmbeddingStore(2, num_shards=1, capacity=3,
                         optimizer={"name": "sgd", "learning_rate": 1.0})
  store.lookup(_ids(1, 2, 3))
  store.apply_gradients(_ids(1), np.ones((1, 2), np.float32))
  return store


def test_insert_spares_row_read_in_call():
  store = _trained_store()
  trained = store.lookup(_ids(1), train=False)
  # 4 is absent and 1 is the least recently used row, but this call reads 1,
  # so 4 takes the row of 2 instead.
  out = store.lookup(_ids(4, 1))
  np.testing.assert_array_equal(out[0], store.initial_values(_ids(4))[0])
  np.testing.assert_array_equal(out[1], trained[0])


def test_insert_and_read_in_one_call_counts():
  store = _trained_store()
  before = store.stats()
  store.lookup(_ids(4, 1))
  after = store.stats()
  assert after["misses"] - before["misses"] == 1
  assert after["hits"] - before["hits"] == 1
  assert after["evictions"] - before["evictions"] == 1


def test_insert_and_read_in_one_call_lru_order():
  store = _trained_store()
  store.lookup(_ids(4, 1))  # Evicts 2; the call's IDs follow by last occurrence.
  assert store.export_shards()[0]["keys"].tolist() == [3, 4, 1]


def test_repeated_absent_id_hits_new_row():
  store = EmbeddingStore(2, num_shards=1, optimizer={"name": "sgd"})
  out = store.lookup(_ids(7, 7))
  np.testing.assert_array_equal(out, store.initial_values(_ids(7, 7)))
  stats = store.stats()
  assert stats["misses"] == 1
  assert stats["hits"] == 1
  assert stats["rows"] == 1


def test_eviction_after_refill_within_call_is_exact():
  # The second call inserts 3 and then 0, whose eviction refills the buffer
  # while 3 (a row of this call) is stored. The third call must evict 0, the
  # least recently used, not 3.
  store = EmbeddingStore(1, num_shards=1, capacity=2, optimizer={"name": "sgd"})
  for call in ([2, 2], [3, 0, 3, 3], [1]):
    store.lookup(np.array(call, np.uint64))
  assert store.export_shards()[0]["keys"].tolist() == [3, 1]


def test_small_shards_match_reference_lru():
  # Small capacities keep rows of the current call in the eviction buffer,
  # which is where an inexact buffer would show.
  rng = np.random.default_rng(11)
  for capacity in (2, 3, 5, 17):
    store = EmbeddingStore(1, num_shards=1, capacity=capacity, optimizer={"name": "sgd"})
    model = numpy_reference.LruReference(capacity)
    for _ in range(300):
      batch = rng.integers(0, 3 * capacity, rng.integers(1, capacity + 1)).astype(np.uint64)
      store.lookup(batch)
      model.lookup(batch)
      assert store.export_shards()[0]["keys"].tolist() == model.keys(), capacity
    assert store.stats()["evictions"] == model.evictions
