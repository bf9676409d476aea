"""Tests of the store's speed-oriented kernels against plain Python and numpy references.

Covers the counting-sort shard routing, the per-call deduplication that
groups distinct IDs by shard (and sums their gradients), the exact LRU
eviction built on recency stamps and a candidate buffer, the distinct-ID counting that skips
hits, and the lock-order-free shard scheduling of concurrent calls.
"""

import threading

import numpy as np
import pytest

from persia_jax.embedding import kernels
from persia_jax.embedding.store import EmbeddingStore
from tests import numpy_reference

_EDGE_IDS = np.array([0, 1, 2**63, 2**64 - 1], np.uint64)


def _random_ids(seed: int, n: int, high: int) -> np.ndarray:
  ids = np.random.default_rng(seed).integers(0, high, n, dtype=np.uint64)
  return np.concatenate([ids, _EDGE_IDS])


@pytest.mark.parametrize("num_shards", [1, 3, 4, 7, 8])
def test_route_matches_stable_argsort(num_shards):
  ids = _random_ids(0, 5000, 2**64 - 1)
  positions, bounds = kernels.route(ids, num_shards)
  shard = (kernels.splitmix64_numpy(ids) % np.uint64(num_shards)).astype(np.int64)
  np.testing.assert_array_equal(positions, np.argsort(shard, kind="stable"))
  expected_bounds = np.concatenate([[0], np.cumsum(np.bincount(shard, minlength=num_shards))])
  np.testing.assert_array_equal(bounds, expected_bounds)


def test_route_of_no_ids_is_empty():
  positions, bounds = kernels.route(np.zeros(0, np.uint64), 4)
  assert positions.shape == (0,)
  np.testing.assert_array_equal(bounds, np.zeros(5, np.int64))


def _reference_lru(batches, capacities, shard_of):
  """Exact LRU per shard; returns the keys per shard (LRU first) and the evictions."""
  caches = [numpy_reference.LruReference(capacity) for capacity in capacities]
  for batch in batches:
    shards = shard_of(batch)
    for s, cache in enumerate(caches):
      cache.lookup(batch[shards == s])
  return [cache.keys() for cache in caches], sum(cache.evictions for cache in caches)


@pytest.mark.parametrize("num_shards,capacity", [(1, 40), (3, 100)])
def test_eviction_order_matches_reference_lru(num_shards, capacity):
  # Hundreds of evictions per shard, so the candidate buffer (16 rows here)
  # is refilled many times, including after its candidates were touched.
  rng = np.random.default_rng(1)
  batches = [rng.zipf(1.3, 64).astype(np.uint64) % np.uint64(300) for _ in range(60)]
  store = EmbeddingStore(2, num_shards=num_shards, capacity=capacity,
                         optimizer={"name": "sgd"})
  for batch in batches:
    store.lookup(batch, train=True)
  expected, evictions = _reference_lru(batches, store._shard_capacities, store.shard_of)
  assert store.stats()["evictions"] == evictions
  for s, shard in enumerate(store.export_shards()):
    assert shard["keys"].tolist() == expected[s], f"shard {s}"


def test_eval_lookups_and_gradients_do_not_refresh_recency():
  store = EmbeddingStore(1, num_shards=1, capacity=3, optimizer={"name": "sgd"})
  store.lookup(np.array([1, 2, 3], np.uint64))
  store.lookup(np.array([1], np.uint64), train=False)
  store.apply_gradients(np.array([1], np.uint64), np.ones((1, 1), np.float32))
  store.lookup(np.array([4], np.uint64))  # Evicts 1, the least recently trained.
  assert store.export_shards()[0]["keys"].tolist() == [2, 3, 4]


def test_checkpoint_order_survives_import_and_further_evictions():
  store = EmbeddingStore(1, num_shards=1, capacity=4, optimizer={"name": "sgd"})
  store.lookup(np.array([5, 6, 7, 8, 5], np.uint64))
  exported = store.export_shards()[0]
  assert exported["keys"].tolist() == [6, 7, 8, 5]
  store.import_rows(exported["keys"], exported["rows"], exported["state"])
  store.lookup(np.array([9], np.uint64))  # Evicts 6, the oldest imported row.
  assert store.export_shards()[0]["keys"].tolist() == [7, 8, 5, 9]


def test_distinct_count_after_import_without_registers_counts_hits():
  keys = np.arange(20, dtype=np.uint64)
  fresh = EmbeddingStore(1, num_shards=2)
  fresh.lookup(keys)
  imported = EmbeddingStore(1, num_shards=2)
  state = np.zeros((20, imported.optimizer.slot_width(1)), np.float32)
  imported.import_rows(keys, np.zeros((20, 1), np.float32), state)
  imported.lookup(keys)  # All hits; they must still reach the distinct-ID registers.
  assert imported.stats()["distinct_ids_seen"] == fresh.stats()["distinct_ids_seen"]


def test_repeated_hits_keep_distinct_count():
  keys = np.arange(30, dtype=np.uint64)
  once = EmbeddingStore(1, num_shards=2)
  once.lookup(keys)
  repeated = EmbeddingStore(1, num_shards=2)
  for _ in range(3):
    repeated.lookup(keys)
  assert repeated.stats()["distinct_ids_seen"] == once.stats()["distinct_ids_seen"]


def test_concurrent_calls_match_serial_calls():
  # Two threads take shards in whatever order their locks come free; every
  # batch hits existing rows only, so the result cannot depend on that order.
  rng = np.random.default_rng(2)
  keys = np.arange(2000, dtype=np.uint64)
  batches = [rng.integers(0, 2000, 3000).astype(np.uint64) for _ in range(8)]
  grads = [rng.normal(0, 1, (3000, 4)).astype(np.float32) for _ in range(8)]
  serial = EmbeddingStore(4, num_shards=4, optimizer={"name": "sgd", "learning_rate": 0.5})
  parallel = EmbeddingStore(4, num_shards=4, optimizer={"name": "sgd", "learning_rate": 0.5})
  for store in (serial, parallel):
    store.lookup(keys)
  for ids, grad in zip(batches, grads):
    serial.apply_gradients(ids, grad)

  def work(indices):
    for i in indices:
      parallel.apply_gradients(batches[i], grads[i])

  threads = [threading.Thread(target=work, args=(range(t, 8, 2),)) for t in range(2)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  # SGD updates commute up to float rounding.
  np.testing.assert_allclose(parallel.lookup(keys, train=False),
                             serial.lookup(keys, train=False), rtol=1e-5, atol=1e-6)


def _shards_numpy(ids: np.ndarray, num_shards: int) -> np.ndarray:
  return (kernels.splitmix64_numpy(ids) % np.uint64(num_shards)).astype(np.int64)


@pytest.mark.parametrize("num_shards", [1, 3, 4])
def test_dedup_route_matches_numpy(num_shards):
  ids = np.concatenate([_random_ids(5, 3000, 700), _EDGE_IDS, _EDGE_IDS[::-1]])
  positions, lasts, counts, bounds, inverse = kernels.dedup_route(ids, num_shards)
  unique, first, unique_of_id, count = np.unique(
      ids, return_index=True, return_inverse=True, return_counts=True)
  last = ids.shape[0] - 1 - np.unique(ids[::-1], return_index=True)[1]
  # Distinct IDs in order of first occurrence, then grouped by shard (stable).
  by_first = np.argsort(first)
  shard = _shards_numpy(unique[by_first], num_shards)
  order = by_first[np.argsort(shard, kind="stable")]
  np.testing.assert_array_equal(positions, first[order])
  np.testing.assert_array_equal(lasts, last[order])
  np.testing.assert_array_equal(counts, count[order])
  expected_bounds = np.concatenate([[0], np.cumsum(np.bincount(shard, minlength=num_shards))])
  np.testing.assert_array_equal(bounds, expected_bounds)
  # Every ID maps to the entry of its own distinct ID.
  np.testing.assert_array_equal(positions[inverse], first[unique_of_id])


@pytest.mark.parametrize("num_shards", [1, 4])
def test_dedup_sum_route_matches_numpy(num_shards):
  ids = _random_ids(6, 2000, 300)
  grads = np.random.default_rng(6).normal(0, 1, (ids.shape[0], 3)).astype(np.float32)
  unique, summed, positions, counts, bounds = kernels.dedup_sum_route(ids, grads, num_shards)
  first_unique, first, inverse, count = np.unique(
      ids, return_index=True, return_inverse=True, return_counts=True)
  by_first = np.argsort(first)
  np.testing.assert_array_equal(unique, first_unique[by_first])
  # np.add.at adds in index order, the arrival order the kernel sums in.
  expected = np.zeros((first_unique.shape[0], 3), np.float32)
  np.add.at(expected, inverse, grads)
  np.testing.assert_array_equal(summed, expected[by_first])
  shard = _shards_numpy(unique, num_shards)
  np.testing.assert_array_equal(positions, np.argsort(shard, kind="stable"))
  np.testing.assert_array_equal(counts, count[by_first][positions])
  assert bounds[-1] == unique.shape[0]


def test_copy_duplicates_fills_repeats_from_first_occurrence():
  ids = np.array([5, 7, 5, 9, 7, 5], np.uint64)
  positions, *_, inverse = kernels.dedup_route(ids, 1)
  out = np.zeros((6, 2), np.float32)
  out[[0, 1, 3]] = [[1, 1], [2, 2], [3, 3]]
  kernels.copy_duplicates(out, positions, inverse)
  np.testing.assert_array_equal(out[:, 0], [1, 2, 1, 3, 2, 1])


@pytest.mark.parametrize("num_shards", [1, 3])
def test_expand_rows_gives_each_id_its_compact_row(num_shards):
  ids = _random_ids(8, 500, 40)
  positions, *_, inverse = kernels.dedup_route(ids, num_shards)
  # Compact row c contains the first position of distinct ID c as its value.
  compact = np.repeat(positions.astype(np.float32)[:, None], 2, axis=1)
  out = np.zeros((ids.shape[0], 2), np.float32)
  kernels.expand_rows(out, compact, inverse)
  _, first, unique_of_id = np.unique(ids, return_index=True, return_inverse=True)
  np.testing.assert_array_equal(out[:, 1], first[unique_of_id].astype(np.float32))
