"""EmbeddingStore lookups, initial values, LRU eviction, admission, counters and input checks."""

import numpy as np
import pytest

from persia_jax.embedding import kernels
from persia_jax.embedding import memory
from persia_jax.embedding import store as store_module
from persia_jax.embedding.store import EmbeddingStore
from tests import numpy_reference

MAX_ID = 2**64 - 1


def _ids(*values) -> np.ndarray:
  return np.array(values, np.uint64)


def _stored_ids_lru_first(store: EmbeddingStore) -> list[int]:
  """Returns the stored IDs of a one-shard store, least recently used first."""
  (shard,) = store.export_shards()
  return [int(key) for key in shard["keys"]]


# ----------------------------------------------------------------------------
# Lookup and initial values.
# ----------------------------------------------------------------------------


def test_lookup_duplicates_get_identical_rows():
  store = EmbeddingStore(8)
  rows = store.lookup(_ids(5, 9, 5, 5, 9))
  np.testing.assert_array_equal(rows[0], rows[2])
  np.testing.assert_array_equal(rows[0], rows[3])
  np.testing.assert_array_equal(rows[1], rows[4])
  assert len(store) == 2


@pytest.mark.parametrize("high", [30, 100_000])  # Mostly repeats, almost none.
@pytest.mark.parametrize("train", [True, False])
def test_batch_lookup_matches_one_id_per_call(high, train):
  # A batch lookup takes the compact path when most IDs repeat and writes in
  # place otherwise. Both must equal looking up one ID per call.
  rng = np.random.default_rng(4)
  warmup = rng.integers(0, high, 300).astype(np.uint64)
  batch = rng.integers(0, high, 1000).astype(np.uint64)
  grads = rng.normal(0, 1, (300, 3)).astype(np.float32)
  stores = []
  for _ in range(2):
    store = EmbeddingStore(3, num_shards=3, capacity=5000, init_scale=1.0,
                           optimizer={"name": "sgd", "learning_rate": 1.0})
    store.lookup(warmup)
    store.apply_gradients(warmup, grads)
    stores.append(store)
  batched, single = stores
  out = batched.lookup(batch, train=train)
  expected = np.concatenate([single.lookup(batch[i:i + 1], train=train)
                             for i in range(batch.shape[0])])
  np.testing.assert_array_equal(out, expected)
  assert batched.stats() == single.stats()
  for left, right in zip(batched.export_shards(), single.export_shards()):
    assert left["keys"].tolist() == right["keys"].tolist()


def test_initial_values_match_reference_formula():
  ids = _ids(0, 1, 12345, 2**63, MAX_ID)
  store = EmbeddingStore(5, seed=77, init_scale=0.3)
  expected = numpy_reference.initial_values(ids, seed=77, init_scale=0.3, dim=5)
  np.testing.assert_array_equal(store.initial_values(ids), expected)
  np.testing.assert_array_equal(store.lookup(ids), expected)


def test_initial_values_in_range_and_seed_dependent():
  ids = np.arange(2000, dtype=np.uint64)
  values = EmbeddingStore(4, init_scale=0.5, seed=1).initial_values(ids)
  other_seed = EmbeddingStore(4, init_scale=0.5, seed=2).initial_values(ids)
  assert values.min() >= -0.5
  assert values.max() < 0.5
  assert abs(values.mean()) < 0.02  # Uniform: mean 0, std 0.29 / sqrt(8000).
  assert not np.any(values == other_seed)


def test_initial_value_independent_of_shards_capacity_and_order():
  ids = np.random.default_rng(0).integers(0, MAX_ID, 300, dtype=np.uint64, endpoint=True)
  reference = EmbeddingStore(8, num_shards=1, seed=4).lookup(ids)
  permutation = np.random.default_rng(1).permutation(ids.size)
  layouts = [dict(num_shards=4), dict(num_shards=3, capacity=30), dict(num_shards=7)]
  for layout in layouts:
    store = EmbeddingStore(8, seed=4, **layout)
    shuffled = store.lookup(ids[permutation])
    np.testing.assert_array_equal(shuffled[np.argsort(permutation)], reference,
                                  err_msg=str(layout))


def test_zero_and_max_ids_are_distinct_rows():
  store = EmbeddingStore(4, optimizer={"name": "sgd", "learning_rate": 1.0})
  first = store.lookup(_ids(0, MAX_ID)).copy()
  assert len(store) == 2
  assert not np.array_equal(first[0], first[1])
  store.apply_gradients(_ids(0), np.ones((1, 4), np.float32))
  after = store.lookup(_ids(0, MAX_ID), train=False)
  np.testing.assert_array_equal(after[0], first[0] - 1.0)
  np.testing.assert_array_equal(after[1], first[1])


def test_lookup_writes_into_out_buffer():
  store = EmbeddingStore(3)
  out = memory.aligned_zeros((4, 3), np.float32)
  result = store.lookup(_ids(1, 2, 3, 1), out=out)
  assert result is out
  np.testing.assert_array_equal(out, store.initial_values(_ids(1, 2, 3, 1)))


@pytest.mark.parametrize("buffer,message", [
    (np.zeros((4, 3), np.float64), "float32"),
    (np.zeros((3, 3), np.float32), r"\[4, 3\]"),
    (np.zeros((4, 6), np.float32)[:, ::2], "C-contiguous"),
])
def test_lookup_rejects_bad_out_buffer(buffer, message):
  with pytest.raises(ValueError, match=message):
    EmbeddingStore(3).lookup(_ids(1, 2, 3, 4), out=buffer)


def test_output_and_shard_arrays_are_aligned():
  store = EmbeddingStore(5, num_shards=2, capacity=1000, optimizer={"name": "adam"})
  out = store.lookup(np.arange(100, dtype=np.uint64))
  assert memory.is_aligned(out)
  for shard in store._shards:  # pylint: disable=protected-access
    for array in (shard.rows, shard.state, shard.table, shard.candidates):
      assert memory.is_aligned(array)


def test_empty_lookup_and_update():
  store = EmbeddingStore(3)
  assert store.lookup(_ids()).shape == (0, 3)
  store.apply_gradients(_ids(), np.zeros((0, 3), np.float32))
  assert len(store) == 0


# ----------------------------------------------------------------------------
# Eval lookups, LRU eviction and capacity.
# ----------------------------------------------------------------------------


def test_eval_lookup_is_read_only():
  store = EmbeddingStore(4, seed=9)
  values = store.lookup(_ids(10, 11), train=False)
  np.testing.assert_array_equal(values, store.initial_values(_ids(10, 11)))
  assert len(store) == 0
  assert store.stats()["eval_misses"] == 2
  assert store.stats()["misses"] == 0


def test_eval_lookup_zeros_for_unknown():
  store = EmbeddingStore(4, unknown_id="zeros")
  store.lookup(_ids(1))
  values = store.lookup(_ids(1, 2), train=False)
  np.testing.assert_array_equal(values[0], store.initial_values(_ids(1))[0])
  np.testing.assert_array_equal(values[1], np.zeros(4, np.float32))
  assert len(store) == 1


def test_lru_eviction_order_capacity_three():
  store = EmbeddingStore(2, num_shards=1, capacity=3,
                         optimizer={"name": "sgd", "learning_rate": 1.0})
  store.lookup(_ids(1, 2, 3))
  assert _stored_ids_lru_first(store) == [1, 2, 3]

  store.lookup(_ids(1))  # Training lookups refresh recency: order 2, 3, 1.
  store.lookup(_ids(4))  # Evicts 2, the least recently used.
  assert _stored_ids_lru_first(store) == [3, 1, 4]

  store.apply_gradients(_ids(3), np.ones((1, 2), np.float32))  # No refresh.
  store.lookup(_ids(1), train=False)  # No refresh either.
  store.lookup(_ids(5))  # Evicts 3.
  assert _stored_ids_lru_first(store) == [1, 4, 5]

  store.lookup(_ids(6, 7))  # Evicts 1, then 4.
  assert _stored_ids_lru_first(store) == [5, 6, 7]
  assert store.stats()["evictions"] == 4


def test_evicted_row_comes_back_with_initial_value():
  store = EmbeddingStore(2, num_shards=1, capacity=1,
                         optimizer={"name": "sgd", "learning_rate": 1.0})
  store.lookup(_ids(1))
  store.apply_gradients(_ids(1), np.ones((1, 2), np.float32))
  store.lookup(_ids(2))  # Evicts 1 and its trained value.
  np.testing.assert_array_equal(store.lookup(_ids(1)), store.initial_values(_ids(1)))


def test_eviction_keeps_map_consistent_under_churn():
  # Many evictions exercise backward-shift deletion; every stored row must
  # still be found, with its own value.
  store = EmbeddingStore(3, num_shards=2, capacity=64, init_scale=1.0)
  rng = np.random.default_rng(0)
  for _ in range(20):
    store.lookup(rng.integers(0, 500, 40).astype(np.uint64))
  keys = np.concatenate([shard["keys"] for shard in store.export_shards()])
  assert len(store) == 64
  assert np.unique(keys).size == 64
  np.testing.assert_array_equal(store.lookup(keys, train=False), store.initial_values(keys))
  assert store.stats()["eval_misses"] == 0


def test_lru_matches_ordered_dict_model():
  # A plain OrderedDict LRU cache is the reference for which IDs are stored
  # and in what recency order, over many batches with duplicates and
  # evictions (which also exercise backward-shift deletion with wrap-around).
  capacity = 50
  store = EmbeddingStore(1, num_shards=1, capacity=capacity)
  model = numpy_reference.LruReference(capacity)
  rng = np.random.default_rng(7)
  for _ in range(200):
    batch = rng.integers(0, 200, rng.integers(1, 30)).astype(np.uint64)
    store.lookup(batch)
    model.lookup(batch)
    if rng.random() < 0.3:  # Eval lookups and updates must not change the order.
      store.lookup(batch[::-1], train=False)
      store.apply_gradients(batch, np.zeros((batch.size, 1), np.float32))
    assert _stored_ids_lru_first(store) == model.keys()


def test_routing_is_splitmix64_modulo_shards():
  ids = _ids(0, 1, 99, 2**40 + 3, MAX_ID)
  store = EmbeddingStore(2, num_shards=7)
  expected = [numpy_reference.splitmix64(int(i)) % 7 for i in ids]
  assert store.shard_of(ids).tolist() == expected


def test_capacity_split_evenly_over_shards():
  store = EmbeddingStore(2, num_shards=4, capacity=10)
  assert [shard.capacity for shard in store._shards] == [3, 3, 2, 2]  # pylint: disable=protected-access
  store.lookup(np.arange(1000, dtype=np.uint64))
  assert len(store) == 10


# ----------------------------------------------------------------------------
# Admission.
# ----------------------------------------------------------------------------


def test_admission_probability_zero_inserts_nothing():
  store = EmbeddingStore(4, admission_probability=0.0)
  ids = _ids(1, 2, 3)
  np.testing.assert_array_equal(store.lookup(ids), store.initial_values(ids))
  store.apply_gradients(ids, np.ones((3, 4), np.float32))
  stats = store.stats()
  assert len(store) == 0
  assert stats["rejected_admissions"] == 3
  assert stats["absent_gradients"] == 3


def test_admission_probability_is_deterministic_per_id():
  ids = np.arange(20000, dtype=np.uint64)
  first = EmbeddingStore(1, num_shards=2, admission_probability=0.3, seed=1)
  second = EmbeddingStore(1, num_shards=5, admission_probability=0.3, seed=1)
  first.lookup(ids)
  second.lookup(ids[::-1])
  admitted_first = np.sort(np.concatenate([s["keys"] for s in first.export_shards()]))
  admitted_second = np.sort(np.concatenate([s["keys"] for s in second.export_shards()]))
  np.testing.assert_array_equal(admitted_first, admitted_second)
  # Binomial(20000, 0.3): the standard deviation of the count is 65.
  assert 5700 < admitted_first.size < 6300
  first.lookup(ids)  # Rejected IDs stay rejected.
  assert len(first) == admitted_first.size


def test_admission_min_count_two():
  store = EmbeddingStore(4, admission_min_count=2)
  assert store.lookup(_ids(7)).tolist() == store.initial_values(_ids(7)).tolist()
  assert len(store) == 0
  store.lookup(_ids(7))  # Second occurrence: inserted.
  assert len(store) == 1
  store.lookup(_ids(8, 8))  # Two occurrences in one batch: the second inserts.
  assert len(store) == 2
  stats = store.stats()
  assert stats["rejected_admissions"] == 2
  assert stats["inserts"] == 2
  assert stats["misses"] == 4


def test_admission_min_count_rarely_admits_early():
  # Sketch collisions can admit an ID at its first occurrence; with a
  # 65536-wide sketch and 5000 IDs about 0.5% of them are expected to be.
  store = EmbeddingStore(1, num_shards=1, capacity=10000, admission_min_count=2)
  store.lookup(np.arange(5000, dtype=np.uint64) * 31)
  assert len(store) < 100


def test_admission_counts_age_out():
  # One shard of capacity 1000 gets a 4096-wide sketch whose counters halve
  # every 4096 / 4 = 1024 counted occurrences.
  store = EmbeddingStore(1, num_shards=1, capacity=1000, admission_min_count=2)
  store.lookup(_ids(5))  # Count 1.
  store.lookup(np.arange(10, 10 + 1023, dtype=np.uint64))  # Halving: 1 -> 0.
  store.lookup(_ids(5))  # Count 1 again: still rejected.
  assert 5 not in _stored_ids_lru_first(store)
  store.lookup(_ids(5))
  assert 5 in _stored_ids_lru_first(store)


# ----------------------------------------------------------------------------
# Counters.
# ----------------------------------------------------------------------------


def test_counters_exact_on_hand_built_sequence():
  store = EmbeddingStore(2, num_shards=1, capacity=2,
                         optimizer={"name": "sgd", "learning_rate": 1.0})
  store.lookup(_ids(1, 2, 1))       # miss+insert 1, miss+insert 2, hit 1
  store.lookup(_ids(3))             # miss+insert 3, evicts 2
  store.lookup(_ids(2), train=False)  # eval miss
  store.lookup(_ids(1), train=False)  # eval hit
  grads = np.ones((4, 2), np.float32)
  grads[3, 0] = np.inf
  store.apply_gradients(_ids(1, 2, 1, 3), grads)  # 2 absent, 3 non-finite, 1 updated
  expected = {
      "hits": 1, "misses": 3, "inserts": 3, "evictions": 1, "rejected_admissions": 0,
      "absent_gradients": 1, "nonfinite_gradients": 1, "updated_rows": 1,
      "eval_hits": 1, "eval_misses": 1, "rows": 2, "capacity": 2, "distinct_ids_seen": 3,
  }
  stats = store.stats()
  for name, value in expected.items():
    assert stats[name] == value, name


def test_distinct_ids_estimate_is_close():
  store = EmbeddingStore(1, num_shards=4)
  ids = np.arange(50000, dtype=np.uint64) * 7
  store.lookup(ids)
  store.lookup(ids[:1000])
  # HyperLogLog with 4096 registers: standard error 1.6%; allow 5%.
  assert abs(store.stats()["distinct_ids_seen"] - 50000) < 2500


def test_unbounded_store_keeps_no_eviction_candidates():
  store = EmbeddingStore(16, num_shards=2, optimizer={"name": "sgd"})
  store.lookup(np.arange(3000, dtype=np.uint64))
  for shard in store._shards:  # pylint: disable=protected-access
    assert shard.candidates.shape == (0, 2)
  assert store.stats()["capacity"] is None
  # The index is one 16-byte table slot (key, stamp and row) per MAX_LOAD
  # rows. The arrays grow by 1.25x, so up to 20% of the allocated rows are spare.
  assert store.bytes_per_row() <= (64 + 16 / kernels.MAX_LOAD) / 0.8 + 4096 * 2 / 3000


def test_bytes_per_row_at_full_table():
  store = EmbeddingStore(32, num_shards=4, capacity=40000, optimizer={"name": "adagrad"})
  store.lookup(np.arange(200000, dtype=np.uint64))
  assert len(store) == 40000
  assert store.theoretical_bytes_per_row() == 256
  assert store.bytes_per_row() <= 1.25 * 256


# ----------------------------------------------------------------------------
# Bad input.
# ----------------------------------------------------------------------------


def test_signed_ids_converted_when_non_negative():
  store = EmbeddingStore(3)
  np.testing.assert_array_equal(store.lookup(np.array([0, 5], np.int64)),
                                store.lookup(_ids(0, 5)))
  np.testing.assert_array_equal(store.lookup(np.array([5], np.int8)),
                                store.lookup(_ids(5)))


def test_python_int_lists_converted_exactly():
  store = EmbeddingStore(3)
  assert store.lookup([]).shape == (0, 3)
  np.testing.assert_array_equal(store.lookup([2**63, 1, MAX_ID]),
                                store.lookup(_ids(2**63, 1, MAX_ID)))


def test_negative_python_int_rejected():
  with pytest.raises(ValueError, match=r"in \[0, 2\*\*64 - 1\], got -2 at index 1"):
    EmbeddingStore(3).lookup([4, -2])


def test_negative_ids_rejected():
  with pytest.raises(ValueError, match="non-negative, got -3 at index 1"):
    EmbeddingStore(3).lookup(np.array([1, -3], np.int64))


@pytest.mark.parametrize("ids", [np.array([1.0, 2.0]), np.array([True]), np.array(["a"])])
def test_non_integer_ids_rejected(ids):
  with pytest.raises(TypeError, match="integer array"):
    EmbeddingStore(3).lookup(ids)


def test_import_rows_rejects_repeated_key():
  store = EmbeddingStore(2, optimizer={"name": "sgd"})
  with pytest.raises(ValueError, match="key 7 more than once"):
    store.import_rows(_ids(3, 7, 7), np.zeros((3, 2), np.float32), np.zeros((3, 0), np.float32))


def test_oversized_call_rejected(monkeypatch):
  monkeypatch.setattr(store_module, "_MAX_CALL_IDS", 4)
  with pytest.raises(ValueError, match="ids has 5 entries; one call takes at most 4"):
    EmbeddingStore(2).lookup(np.arange(5, dtype=np.uint64))


def test_two_dimensional_ids_rejected():
  with pytest.raises(ValueError, match=r"1-D, got shape \(2, 2\)"):
    EmbeddingStore(3).lookup(np.zeros((2, 2), np.uint64))


@pytest.mark.parametrize("grads,message", [
    (np.zeros((2, 3), np.float32), r"same length, got ids \(3,\) and grads \(2, 3\)"),
    (np.zeros((3, 4), np.float32), r"dim=3 columns .* got shape \(3, 4\)"),
    (np.zeros(9, np.float32), r"2-D .* got shape \(9,\)"),
])
def test_bad_gradients_rejected(grads, message):
  with pytest.raises(ValueError, match=message):
    EmbeddingStore(3).apply_gradients(_ids(1, 2, 3), grads)


def test_gradient_dtype_rejected_unless_float():
  with pytest.raises(TypeError, match="floating-point"):
    EmbeddingStore(3).apply_gradients(_ids(1), np.ones((1, 3), np.int32))


@pytest.mark.parametrize("kwargs,message", [
    (dict(dim=0), "dim must be >= 1"),
    (dict(dim=2, capacity=2, num_shards=4), "capacity must be between"),
    (dict(dim=2, admission_probability=1.5), "admission_probability"),
    (dict(dim=2, admission_min_count=0), "admission_min_count"),
    (dict(dim=2, unknown_id="nan"), "unknown_id"),
])
def test_bad_constructor_arguments(kwargs, message):
  dim = kwargs.pop("dim")
  with pytest.raises(ValueError, match=message):
    EmbeddingStore(dim, **kwargs)


# ----------------------------------------------------------------------------
# Shard thread pool.
# ----------------------------------------------------------------------------


def test_thread_pool_gives_same_results():
  rng = np.random.default_rng(3)
  ids = rng.integers(0, 500, 3000).astype(np.uint64)
  grads = rng.normal(size=(ids.size, 4)).astype(np.float32)
  serial = EmbeddingStore(4, num_shards=4, optimizer={"name": "adam"})
  pooled = EmbeddingStore(4, num_shards=4, optimizer={"name": "adam"}, num_threads=3)
  for store in (serial, pooled):
    store.lookup(ids)
    store.apply_gradients(ids, grads)
  np.testing.assert_array_equal(pooled.lookup(ids), serial.lookup(ids))
  assert pooled.stats() == serial.stats()
  pooled.close()
  np.testing.assert_array_equal(pooled.lookup(ids), serial.lookup(ids))


def test_thread_pool_error_reaches_caller(monkeypatch):
  store = EmbeddingStore(4, num_shards=4, num_threads=2)
  ids = np.arange(100, dtype=np.uint64)
  store.lookup(ids)

  def failing_kernel(*args):
    raise RuntimeError("kernel failed")

  monkeypatch.setattr(kernels, "apply_gradients", failing_kernel)
  with pytest.raises(RuntimeError, match="kernel failed"):
    store.apply_gradients(ids, np.ones((100, 4), np.float32))
  store.close()
