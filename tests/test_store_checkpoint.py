"""EmbeddingStore checkpoints: round trip, re-sharding, mismatches and atomic commit."""

import json
import os

import numpy as np
import pytest

from persia_jax.embedding import checkpoint
from persia_jax.embedding.store import EmbeddingStore

DIM = 4
ADAM = {"name": "adam", "learning_rate": 0.05}


def _trained_store(num_shards: int = 4, **kwargs) -> tuple[EmbeddingStore, np.ndarray]:
  store = EmbeddingStore(DIM, num_shards=num_shards, optimizer=ADAM, seed=11, **kwargs)
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 2**64 - 1, 300, dtype=np.uint64, endpoint=True)
  ids[:2] = [0, 2**64 - 1]
  for _ in range(3):
    batch = ids[rng.integers(0, ids.size, 200)]
    store.lookup(batch)
    store.apply_gradients(batch, rng.normal(size=(batch.size, DIM)).astype(np.float32))
  return store, np.unique(ids)


def _rows_by_id(store: EmbeddingStore) -> dict[int, tuple[list[float], list[float]]]:
  """Maps every stored ID to its (row, optimizer state) values."""
  result = {}
  for shard in store.export_shards():
    for key, row, state in zip(shard["keys"], shard["rows"], shard["state"]):
      result[int(key)] = (row.tolist(), state.tolist())
  return result


def test_round_trip_same_shards_is_exact(tmp_path):
  store, ids = _trained_store()
  path = str(tmp_path / "ckpt")
  store.save(path)
  loaded = EmbeddingStore.load(path)

  assert loaded.state_spec() == store.state_spec()
  assert _rows_by_id(loaded) == _rows_by_id(store)
  # Same shard count: each shard's LRU order comes back exactly.
  for original, restored in zip(store.export_shards(), loaded.export_shards()):
    np.testing.assert_array_equal(original["keys"], restored["keys"])
  assert loaded.stats() == store.stats()
  np.testing.assert_array_equal(loaded.lookup(ids, train=False),
                                store.lookup(ids, train=False))


@pytest.mark.parametrize("num_shards", [1, 3])
def test_load_reshards_with_identical_values(tmp_path, num_shards):
  store, ids = _trained_store()
  path = str(tmp_path / "ckpt")
  store.save(path)
  loaded = EmbeddingStore.load(path, num_shards=num_shards)
  assert loaded.num_shards == num_shards
  assert len(loaded) == len(store)
  assert _rows_by_id(loaded) == _rows_by_id(store)
  np.testing.assert_array_equal(loaded.lookup(ids, train=False),
                                store.lookup(ids, train=False))


def test_resharded_store_keeps_training_identically(tmp_path):
  store, ids = _trained_store()
  path = str(tmp_path / "ckpt")
  store.save(path)
  loaded = EmbeddingStore.load(path, num_shards=1)
  grads = np.random.default_rng(5).normal(size=(ids.size, DIM)).astype(np.float32)
  for target in (store, loaded):
    target.apply_gradients(ids, grads)
  np.testing.assert_array_equal(loaded.lookup(ids, train=False),
                                store.lookup(ids, train=False))


def test_restore_replaces_contents(tmp_path):
  store, ids = _trained_store()
  path = str(tmp_path / "ckpt")
  store.save(path)
  target = EmbeddingStore(DIM, num_shards=2, optimizer=ADAM, seed=11)
  target.lookup(np.array([123456789], np.uint64))  # Not in the checkpoint.
  target.restore(path)
  assert _rows_by_id(target) == _rows_by_id(store)
  assert 123456789 not in _rows_by_id(target)


def test_restore_rejects_other_dim(tmp_path):
  store, _ = _trained_store()
  path = str(tmp_path / "ckpt")
  store.save(path)
  with pytest.raises(ValueError, match="dim=4 into embedding table 'embedding' with dim=8"):
    EmbeddingStore(8, optimizer=ADAM).restore(path)


def test_restore_rejects_other_optimizer(tmp_path):
  store, _ = _trained_store()
  path = str(tmp_path / "ckpt")
  store.save(path)
  with pytest.raises(ValueError, match="optimizer 'adam' .* with optimizer 'adagrad'"):
    EmbeddingStore(DIM, optimizer={"name": "adagrad"}).restore(path)


def test_restore_keeps_new_learning_rate(tmp_path):
  store, ids = _trained_store()
  path = str(tmp_path / "ckpt")
  store.save(path)
  target = EmbeddingStore(DIM, optimizer=dict(ADAM, learning_rate=0.5), seed=11)
  target.restore(path)
  assert target.optimizer.learning_rate == 0.5
  assert len(target) == len(store)


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
  store, ids = _trained_store()
  path = str(tmp_path / "ckpt")
  store.save(path)
  saved_values = store.lookup(ids, train=False).copy()

  # Change the store, then fail the save after some arrays were written.
  store.apply_gradients(ids, np.ones((ids.size, DIM), np.float32))
  real_write = checkpoint._write_array  # pylint: disable=protected-access
  calls = []

  def failing_write(array_path, array):
    calls.append(array_path)
    if len(calls) == 5:
      raise OSError("simulated disk failure")
    return real_write(array_path, array)

  monkeypatch.setattr(checkpoint, "_write_array", failing_write)
  with pytest.raises(OSError, match="simulated disk failure"):
    store.save(path)
  monkeypatch.undo()

  loaded = EmbeddingStore.load(path)
  np.testing.assert_array_equal(loaded.lookup(ids, train=False), saved_values)

  # The next successful save commits the new values and removes the leftovers.
  store.save(path)
  entries = os.listdir(path)
  assert sorted(e.split("-")[0] for e in entries) == ["data", "manifest.json"]
  np.testing.assert_array_equal(EmbeddingStore.load(path).lookup(ids, train=False),
                                store.lookup(ids, train=False))


def test_failure_before_manifest_commit_keeps_previous(tmp_path, monkeypatch):
  store, ids = _trained_store()
  path = str(tmp_path / "ckpt")
  store.save(path)
  saved_values = store.lookup(ids, train=False).copy()
  store.apply_gradients(ids, np.ones((ids.size, DIM), np.float32))

  def failing_replace(src, dst):
    raise OSError(f"simulated crash before replacing {dst} with {src}")

  monkeypatch.setattr(checkpoint.os, "replace", failing_replace)
  with pytest.raises(OSError, match="simulated crash"):
    store.save(path)
  monkeypatch.undo()

  np.testing.assert_array_equal(EmbeddingStore.load(path).lookup(ids, train=False),
                                saved_values)


def test_manifest_is_json_state_spec(tmp_path):
  store, _ = _trained_store(capacity=1000)
  path = str(tmp_path / "ckpt")
  store.save(path)
  with open(os.path.join(path, "manifest.json"), encoding="utf-8") as f:
    manifest = json.load(f)
  assert manifest["state_spec"] == store.state_spec()
  assert sum(manifest["rows_per_shard"]) == len(store)
  assert manifest["counters"]["inserts"] == store.stats()["inserts"]


def test_load_missing_checkpoint_raises(tmp_path):
  with pytest.raises(FileNotFoundError, match="No embedding checkpoint"):
    EmbeddingStore.load(str(tmp_path / "absent"))


def test_empty_store_and_sgd_round_trip(tmp_path):
  path = str(tmp_path / "ckpt")
  EmbeddingStore(3, optimizer={"name": "sgd"}).save(path)
  loaded = EmbeddingStore.load(path, num_shards=2)
  assert len(loaded) == 0
  assert loaded.optimizer.name == "sgd"


def test_load_into_smaller_capacity_keeps_most_recent(tmp_path):
  store = EmbeddingStore(2, num_shards=1, capacity=100, optimizer={"name": "sgd"})
  store.lookup(np.arange(10, dtype=np.uint64))
  store.lookup(np.array([0], np.uint64))  # 0 becomes the most recent.
  path = str(tmp_path / "ckpt")
  store.save(path)
  target = EmbeddingStore(2, num_shards=1, capacity=3, optimizer={"name": "sgd"})
  target.restore(path)
  (shard,) = target.export_shards()
  assert shard["keys"].tolist() == [8, 9, 0]


def test_load_drops_count_as_evictions(tmp_path):
  store = EmbeddingStore(4, num_shards=4, capacity=8, optimizer={"name": "sgd"})
  store.lookup(np.arange(100, dtype=np.uint64))
  store.save(str(tmp_path / "ckpt"))
  loaded = EmbeddingStore.load(str(tmp_path / "ckpt"), num_shards=3)
  stats = loaded.stats()
  assert stats["inserts"] == 100
  assert stats["inserts"] - stats["evictions"] == stats["rows"]
