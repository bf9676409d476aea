"""Tests of the shard hash table: probe runs, deletion and recency stamps.

A table slot contains a key and an entry, (stamp << 32) | row, or EMPTY.
Keys whose home slots coincide form one probe run. These tests build such
runs on purpose and check that deletion keeps every other key reachable,
including runs that wrap around the end of the table. They also check that
renumbering the stamps when the clock runs out keeps the exact LRU order.
"""

import numpy as np
import pytest

from persia_jax.embedding import kernels
from persia_jax.embedding.store import EmbeddingStore
from tests import numpy_reference

# pylint: disable=protected-access

_TABLE_SIZE = 64


def _fmix64(x: np.ndarray) -> np.ndarray:
  """MurmurHash3's 64-bit finalizer, written from its definition."""
  with np.errstate(over="ignore"):
    x = x ^ (x >> np.uint64(33))
    x = x * np.uint64(0xFF51AFD7ED558CCD)
    x = x ^ (x >> np.uint64(33))
    x = x * np.uint64(0xC4CEB9FE1A85EC53)
    return x ^ (x >> np.uint64(33))


def _homes(keys: np.ndarray) -> np.ndarray:
  return ((_fmix64(keys) >> np.uint64(32)) * np.uint64(_TABLE_SIZE)) >> np.uint64(32)


def _keys_with_home(home: int, count: int) -> np.ndarray:
  """Returns uint64 [count] distinct keys whose home slot is `home`."""
  candidates = np.arange(1, 200_000, dtype=np.uint64)
  found = candidates[_homes(candidates) == np.uint64(home)]
  assert found.size >= count
  return found[:count]


def _table() -> np.ndarray:
  table = np.zeros((_TABLE_SIZE, 2), np.uint64)
  table[:, 1] = kernels.EMPTY
  return table


def _rows_of(table: np.ndarray, keys: np.ndarray) -> list[int]:
  return [int(kernels._find(table, key)[1]) for key in keys]


def test_home_matches_reference_hash():
  keys = np.array([0, 1, 12345, 2**63, 2**64 - 1], np.uint64)
  assert [kernels._home(key, _TABLE_SIZE) for key in keys] == _homes(keys).tolist()


@pytest.mark.parametrize("home", [5, _TABLE_SIZE - 2])  # The second run wraps around.
def test_keys_sharing_a_home_form_one_run(home):
  keys = _keys_with_home(home, 4)
  table = _table()
  for row, key in enumerate(keys):
    kernels._insert_entry(table, key, 7, row)
  slots = [int(kernels._find(table, key)[0]) for key in keys]
  assert slots == [(home + i) % _TABLE_SIZE for i in range(4)]
  assert _rows_of(table, keys) == [0, 1, 2, 3]


@pytest.mark.parametrize("home", [5, _TABLE_SIZE - 2])
@pytest.mark.parametrize("victim", [0, 1, 3])
def test_delete_keeps_the_rest_of_the_run(home, victim):
  keys = _keys_with_home(home, 4)
  table = _table()
  for row, key in enumerate(keys):
    kernels._insert_entry(table, key, 7, row)
  slot, _ = kernels._find(table, keys[victim])
  kernels._delete_slot(table, slot)
  expected = [-1 if i == victim else i for i in range(4)]
  assert _rows_of(table, keys) == expected
  # Backward shift leaves no hole inside the run: 3 entries, then EMPTY.
  occupied = [(home + i) % _TABLE_SIZE for i in range(3)]
  assert all(table[s, 1] != kernels.EMPTY for s in occupied)
  assert table[(home + 3) % _TABLE_SIZE, 1] == kernels.EMPTY


def test_delete_moves_entry_of_another_home_back():
  # Two keys with home 10 fill slots 10 and 11, which pushes the two keys
  # with home 11 to slots 12 and 13. Deleting the key in slot 10 must shift
  # all three others back by one, each staying at or after its home.
  run_h = _keys_with_home(10, 2)
  run_h1 = _keys_with_home(11, 2)
  table = _table()
  for row, key in enumerate([run_h[0], run_h[1], run_h1[0], run_h1[1]]):
    kernels._insert_entry(table, key, 1, row)
  slot, _ = kernels._find(table, run_h[0])
  kernels._delete_slot(table, slot)
  assert _rows_of(table, [run_h[1], run_h1[0], run_h1[1]]) == [1, 2, 3]
  for key in (run_h[1], run_h1[0], run_h1[1]):
    slot = int(kernels._find(table, key)[0])
    assert slot >= int(kernels._home(key, _TABLE_SIZE))


def test_extreme_keys_are_distinct_entries():
  table = _table()
  keys = np.array([0, 2**64 - 1], np.uint64)
  for row, key in enumerate(keys):
    kernels._insert_entry(table, key, 3, row)
  assert _rows_of(table, keys) == [0, 1]
  slot, _ = kernels._find(table, keys[1])
  kernels._delete_slot(table, slot)
  assert _rows_of(table, keys) == [0, -1]


def test_rebuild_keeps_every_entry():
  rng = np.random.default_rng(0)
  keys = np.unique(rng.integers(0, 2**63, 40, dtype=np.uint64))
  table = _table()
  for row, key in enumerate(keys):
    kernels._insert_entry(table, key, row + 100, row)
  bigger = np.zeros((101, 2), np.uint64)
  kernels.rebuild_table(bigger, table)
  assert [int(kernels._find(bigger, key)[1]) for key in keys] == list(range(keys.size))
  slots = [int(kernels._find(bigger, key)[0]) for key in keys]
  assert [int(bigger[s, 1] >> np.uint64(32)) for s in slots] == [r + 100 for r in range(keys.size)]


def _lru_keys(store: EmbeddingStore) -> list[int]:
  return store.export_shards()[0]["keys"].tolist()


def test_stamp_renumbering_keeps_lru_order():
  capacity = 30
  store = EmbeddingStore(1, num_shards=1, capacity=capacity, optimizer={"name": "sgd"})
  model = numpy_reference.LruReference(capacity)
  rng = np.random.default_rng(3)

  def lookup(batch):
    store.lookup(batch)
    model.lookup(batch)

  for _ in range(10):
    lookup(rng.integers(0, 80, 12).astype(np.uint64))
  shard = store._shards[0]
  # Wind the clock to just below the largest stamp: the next lookups run out
  # of clock values and renumber the stamps by rank.
  shard.meta[kernels.META_CLOCK] = kernels.MAX_STAMP - 20
  for _ in range(10):
    lookup(rng.integers(0, 80, 12).astype(np.uint64))
    assert _lru_keys(store) == model.keys()
  assert shard.meta[kernels.META_CLOCK] < 1000
