"""Tests of the hash-table tags when two keys share both home slot and tag.

A table entry keeps the row slot in its low bits and a tag (low bits of
fmix64(key)) above them, and a probe reads a key only when the tag matches.
Random test keys almost never share a tag, so these tests search for keys
whose hashes agree on both the home slot and the tag, and check that the
probe still compares the full key.
"""

import numpy as np
import pytest

from persia_jax.embedding import kernels

_TABLE_SIZE = 1000
_ROW_BITS = 10  # bit_length(1000): row slots of a 1000-slot table.
_TAG_BITS = 31 - _ROW_BITS


def _fmix64(x: np.ndarray) -> np.ndarray:
  """MurmurHash3's 64-bit finalizer, written from its definition."""
  with np.errstate(over="ignore"):
    x = x ^ (x >> np.uint64(33))
    x = x * np.uint64(0xFF51AFD7ED558CCD)
    x = x ^ (x >> np.uint64(33))
    x = x * np.uint64(0xC4CEB9FE1A85EC53)
    return x ^ (x >> np.uint64(33))


def _colliding_keys(count: int) -> np.ndarray:
  """Returns uint64 [count] distinct keys with the same home slot and tag."""
  keys = np.arange(1, 1 << 22, dtype=np.uint64)
  h = _fmix64(keys)
  home = ((h >> np.uint64(32)) * np.uint64(_TABLE_SIZE)) >> np.uint64(32)
  tag = h & np.uint64((1 << _TAG_BITS) - 1)
  signature = home * np.uint64(1 << _TAG_BITS) + tag
  _, counts = np.unique(signature, return_counts=True)
  best = np.argmax(counts)
  if counts[best] < count:
    pytest.skip(f"no {count} keys share home and tag among the candidates")
  order = np.argsort(signature, kind="stable")
  start = int(np.sum(counts[:best]))
  return keys[order[start:start + count]]


@pytest.fixture(name="pair")
def _pair() -> np.ndarray:
  return _colliding_keys(2)


def test_table_entries_of_the_pair_share_their_tag(pair):
  table = np.empty(_TABLE_SIZE, np.int32)
  keys = pair.copy()
  kernels.rebuild_table(table, keys, 2)
  slots = [kernels._find(table, keys, key)[0] for key in pair]  # pylint: disable=protected-access
  assert table[slots[0]] >> _ROW_BITS == table[slots[1]] >> _ROW_BITS


def test_absent_key_with_matching_tag_is_not_found(pair):
  table = np.empty(_TABLE_SIZE, np.int32)
  keys = pair[:1].copy()
  kernels.rebuild_table(table, keys, 1)
  _, row = kernels._find(table, keys, pair[1])  # pylint: disable=protected-access
  assert row == -1


def test_both_keys_with_matching_tag_are_found(pair):
  table = np.empty(_TABLE_SIZE, np.int32)
  keys = pair.copy()
  kernels.rebuild_table(table, keys, 2)
  rows = [kernels._find(table, keys, key)[1] for key in pair]  # pylint: disable=protected-access
  assert rows == [0, 1]


def test_delete_keeps_the_other_key_with_matching_tag(pair):
  table = np.empty(_TABLE_SIZE, np.int32)
  keys = pair.copy()
  kernels.rebuild_table(table, keys, 2)
  slot, _ = kernels._find(table, keys, pair[0])  # pylint: disable=protected-access
  kernels._delete_slot(table, keys, slot)  # pylint: disable=protected-access
  _, row = kernels._find(table, keys, pair[1])  # pylint: disable=protected-access
  assert row == 1


def test_deleted_key_with_matching_tag_is_gone(pair):
  table = np.empty(_TABLE_SIZE, np.int32)
  keys = pair.copy()
  kernels.rebuild_table(table, keys, 2)
  slot, _ = kernels._find(table, keys, pair[0])  # pylint: disable=protected-access
  kernels._delete_slot(table, keys, slot)  # pylint: disable=protected-access
  _, row = kernels._find(table, keys, pair[0])  # pylint: disable=protected-access
  assert row == -1
