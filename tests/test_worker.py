"""Tests of EmbeddingWorker: per-table dedup, pooling, backward, apply and input errors.

The worker only uses the `EmbeddingStoreAPI` methods, so these tests run it on
a small dict-backed store with SGD that also records every call.
"""

import threading
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from persia_jax.data.batch import SparseInput
from persia_jax.embedding import features as features_lib
from persia_jax.embedding.features import FeatureSpec
from persia_jax.embedding.worker import EmbeddingWorker

BATCH = 23


class DictStore:
  """A dict-backed embedding store with SGD that records its calls."""

  def __init__(self, dim, learning_rate=0.5):
    self.dim = dim
    self.learning_rate = learning_rate
    self.rows = {}
    self.lookup_calls = []
    self.apply_calls = []

  def initial_row(self, key):
    return np.random.default_rng(key).uniform(-1, 1, self.dim).astype(np.float32)

  def lookup(self, ids, *, train=True, out=None):
    self.lookup_calls.append(np.array(ids))
    if out is None:
      out = np.empty((ids.shape[0], self.dim), np.float32)
    for j, key in enumerate(ids.tolist()):
      if key not in self.rows:
        row = self.initial_row(key)
        if not train:
          out[j] = row
          continue
        self.rows[key] = row
      out[j] = self.rows[key]
    return out

  def apply_gradients(self, ids, grads):
    self.apply_calls.append((np.array(ids), np.array(grads)))
    for key, grad in zip(ids.tolist(), grads):
      self.rows[key] = self.rows[key] - self.learning_rate * grad

  def stats(self):
    return {"rows": len(self.rows)}

  def save(self, path):
    raise NotImplementedError

  def restore(self, path):
    raise NotImplementedError

  def state_spec(self):
    return {"dim": self.dim}


FEATURES = [
    FeatureSpec("user", table="users", pooling="none"),
    FeatureSpec("friends", table="users", pooling="mean"),
    FeatureSpec("history", table="items", pooling="raw", max_len=3),
    FeatureSpec("tags", table="items", pooling="sum"),
    FeatureSpec("cart", table="items", pooling="sqrtn"),
]
DIMS = {"users": 4, "items": 6}


def _stores():
  return {name: DictStore(dim) for name, dim in DIMS.items()}


def _bags(rng, max_len, vocab, one_hot=False):
  if one_hot:
    lengths = np.ones(BATCH, np.int32)
  else:
    lengths = rng.integers(0, max_len + 1, BATCH).astype(np.int32)
    lengths[:2] = 0
  ids = rng.integers(0, vocab, int(lengths.sum())).astype(np.uint64)
  return SparseInput(ids=ids, lengths=lengths)


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  return {
      "user": _bags(rng, 1, 40, one_hot=True),
      "friends": _bags(rng, 5, 40),
      "history": _bags(rng, 6, 30),
      "tags": _bags(rng, 4, 30),
      "cart": _bags(rng, 4, 30),
  }


def _reference_activation(spec, sparse, store):
  """Pooled activation from the store's current rows, computed with plain numpy."""
  offsets = sparse.offsets
  if spec.pooling == "raw":
    out = np.zeros((BATCH, spec.max_len, store.dim), np.float32)
    mask = np.zeros((BATCH, spec.max_len), np.float32)
    for b in range(BATCH):
      for k, key in enumerate(sparse.ids[offsets[b]:offsets[b + 1]][:spec.max_len]):
        out[b, k] = store.rows.get(int(key), store.initial_row(int(key)))
        mask[b, k] = 1
    return out, mask
  out = np.zeros((BATCH, store.dim), np.float64)
  for b in range(BATCH):
    bag = sparse.ids[offsets[b]:offsets[b + 1]]
    for key in bag:
      out[b] += store.rows.get(int(key), store.initial_row(int(key)))
    if bag.size and spec.pooling == "mean":
      out[b] /= bag.size
    if bag.size and spec.pooling == "sqrtn":
      out[b] /= np.sqrt(bag.size)
  return out, None


def _reference_table_grads(sparse_inputs, grads):
  """Per-table {id: summed gradient} with plain numpy loops."""
  result = {table: {} for table in DIMS}
  for spec in FEATURES:
    sparse = sparse_inputs[spec.name]
    offsets = sparse.offsets
    table = result[spec.table]
    for b in range(BATCH):
      bag = sparse.ids[offsets[b]:offsets[b + 1]]
      if spec.pooling == "raw":
        for k, key in enumerate(bag[:spec.max_len]):
          table[int(key)] = table.get(int(key), 0.0) + grads[spec.name][b, k]
        continue
      scale = {"none": 1.0, "sum": 1.0, "mean": 1.0 / max(bag.size, 1),
               "sqrtn": 1.0 / np.sqrt(max(bag.size, 1))}[spec.pooling]
      for key in bag:
        table[int(key)] = table.get(int(key), 0.0) + scale * grads[spec.name][b]
  return result


def _random_grads(worker, seed=1):
  rng = np.random.default_rng(seed)
  activations, _ = worker.lookup(_batch(), train=False)
  return {name: rng.normal(size=value.shape).astype(np.float32)
          for name, value in activations.values.items()}


@pytest.mark.parametrize("dedup", ["hash", "sort"])
def test_lookup_matches_numpy_reference(dedup):
  stores = _stores()
  worker = EmbeddingWorker(FEATURES, stores, dedup=dedup)
  batch = _batch()
  activations, _ = worker.lookup(batch, train=True)
  for spec in FEATURES:
    expected, expected_mask = _reference_activation(spec, batch[spec.name],
                                                    stores[spec.table])
    np.testing.assert_allclose(activations.values[spec.name], expected, rtol=1e-5,
                               atol=1e-6, err_msg=spec.name)
    if expected_mask is not None:
      np.testing.assert_array_equal(activations.masks[spec.name], expected_mask)


def test_lookup_masks_only_for_raw_features():
  worker = EmbeddingWorker(FEATURES, _stores())
  activations, _ = worker.lookup(_batch(), train=True)
  assert set(activations.masks) == {"history"}


def test_lookup_calls_each_store_once_with_unique_ids():
  stores = _stores()
  worker = EmbeddingWorker(FEATURES, stores)
  batch = _batch()
  worker.lookup(batch, train=True)
  for table, store in stores.items():
    assert len(store.lookup_calls) == 1, table
    ids = store.lookup_calls[0]
    assert np.unique(ids).shape == ids.shape, table


def test_lookup_skips_ids_beyond_max_len():
  stores = _stores()
  worker = EmbeddingWorker(FEATURES, stores)
  batch = _batch()
  worker.lookup(batch, train=True)
  history = batch["history"]
  kept = np.concatenate([history.ids[s:s + min(n, 3)]
                         for s, n in zip(history.offsets[:-1], history.lengths)])
  expected = np.unique(np.concatenate([kept, batch["tags"].ids, batch["cart"].ids]))
  np.testing.assert_array_equal(np.sort(stores["items"].lookup_calls[0]), expected)


def test_output_dims():
  worker = EmbeddingWorker(FEATURES, _stores())
  assert worker.output_dims() == {"user": 4, "friends": 4, "history": 6, "tags": 6,
                                  "cart": 6}


@pytest.mark.parametrize("dedup", ["hash", "sort"])
def test_backward_matches_numpy_reference(dedup):
  worker = EmbeddingWorker(FEATURES, _stores(), dedup=dedup)
  batch = _batch()
  _, ctx = worker.lookup(batch, train=True)
  grads = _random_grads(worker)
  table_grads = worker.backward(ctx, grads)
  reference = _reference_table_grads(batch, grads)
  for table, (ids, values) in table_grads.items():
    assert values.dtype == np.float32
    assert sorted(ids.tolist()) == sorted(reference[table]), table
    expected = np.stack([reference[table][int(key)] for key in ids])
    np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-6, err_msg=table)


def test_backward_matches_jax_grad():
  # The same pooling written in jax.numpy over per-table row matrices.
  stores = _stores()
  worker = EmbeddingWorker(FEATURES, stores)
  batch = _batch()
  _, ctx = worker.lookup(batch, train=True)
  grads = _random_grads(worker)
  table_ids = {table: ctx.unique_ids[table] for table in DIMS}
  table_rows = {table: jnp.asarray(np.stack([stores[table].rows[int(k)] for k in ids]))
                for table, ids in table_ids.items()}

  def row_index(table, ids):
    order = {int(k): i for i, k in enumerate(table_ids[table])}
    return np.array([order[int(k)] for k in ids], np.int32)

  def loss(rows):
    total = 0.0
    for spec in FEATURES:
      sparse = batch[spec.name]
      lengths = sparse.lengths
      segments = np.repeat(np.arange(BATCH), lengths)
      if spec.pooling == "raw":
        positions = np.arange(sparse.ids.shape[0]) - np.repeat(sparse.offsets[:-1], lengths)
        keep = positions < spec.max_len
        gathered = rows[spec.table][row_index(spec.table, sparse.ids[keep])]
        activation = jnp.zeros((BATCH, spec.max_len, DIMS[spec.table]))
        activation = activation.at[segments[keep], positions[keep]].set(gathered)
      else:
        safe = np.maximum(lengths, 1).astype(np.float32)
        scale = {"none": np.ones_like(safe), "sum": np.ones_like(safe),
                 "mean": 1 / safe, "sqrtn": 1 / np.sqrt(safe)}[spec.pooling]
        gathered = rows[spec.table][row_index(spec.table, sparse.ids)]
        activation = jax.ops.segment_sum(gathered * scale[segments][:, None], segments,
                                         num_segments=BATCH)
      total = total + jnp.sum(activation * grads[spec.name])
    return total

  expected = jax.grad(loss)(table_rows)
  table_grads = worker.backward(ctx, grads)
  for table in DIMS:
    np.testing.assert_allclose(table_grads[table][1], np.asarray(expected[table]),
                               rtol=1e-5, atol=1e-5, err_msg=table)


def test_backward_accepts_jax_arrays():
  worker = EmbeddingWorker(FEATURES, _stores())
  _, ctx = worker.lookup(_batch(), train=True)
  grads = _random_grads(worker)
  from_numpy = worker.backward(ctx, grads)
  from_jax = worker.backward(ctx, {k: jnp.asarray(v) for k, v in grads.items()})
  for table in DIMS:
    np.testing.assert_array_equal(from_jax[table][1], from_numpy[table][1])


def test_apply_sends_table_grads_to_stores():
  stores = _stores()
  worker = EmbeddingWorker(FEATURES, stores)
  _, ctx = worker.lookup(_batch(), train=True)
  table_grads = worker.backward(ctx, _random_grads(worker))
  before = {table: dict(store.rows) for table, store in stores.items()}
  worker.apply(table_grads)
  for table, (ids, values) in table_grads.items():
    assert len(stores[table].apply_calls) == 1
    key = int(ids[0])
    np.testing.assert_allclose(stores[table].rows[key],
                               before[table][key] - 0.5 * values[0], rtol=1e-6)


def test_stats_count_ids_and_unique_ratio():
  worker = EmbeddingWorker([FeatureSpec("f", table="t", pooling="sum")],
                           {"t": DictStore(2)})
  ids = np.array([1, 1, 2, 3, 3, 3], np.uint64)
  worker.lookup({"f": SparseInput(ids, np.array([2, 4], np.int32))}, train=True)
  stats = worker.stats()
  assert stats["lookups"] == 1
  assert stats["ids"] == 6
  assert stats["unique_ids"] == 3
  assert stats["unique_ratio"] == 0.5


def test_empty_batch():
  worker = EmbeddingWorker([FeatureSpec("f", table="t", pooling="mean")],
                           {"t": DictStore(3)})
  sparse = SparseInput(np.zeros(0, np.uint64), np.zeros(4, np.int32))
  activations, ctx = worker.lookup({"f": sparse}, train=True)
  np.testing.assert_array_equal(activations.values["f"], np.zeros((4, 3)))
  ids, grads = worker.backward(ctx, {"f": np.ones((4, 3), np.float32)})["t"]
  assert ids.shape == (0,)
  assert grads.shape == (0, 3)


def test_build_stores_with_real_store():
  store_lib = pytest.importorskip("persia_jax.embedding.store")
  del store_lib
  tables, specs = features_lib.specs_from_config({
      "tables": {"t": {"dim": 8, "optimizer": {"name": "sgd", "learning_rate": 0.1}}},
      "features": {"f": {"table": "t", "pooling": "mean"}},
  })
  stores = features_lib.build_stores(tables, seed=0)
  worker = EmbeddingWorker(specs, stores)
  sparse = SparseInput(np.array([5, 6, 5], np.uint64), np.array([2, 1], np.int32))
  activations, ctx = worker.lookup({"f": sparse}, train=True)
  rows = stores["t"].lookup(np.array([5, 6], np.uint64), train=False)
  np.testing.assert_allclose(activations.values["f"],
                             [(rows[0] + rows[1]) / 2, rows[0]], rtol=1e-6)
  table_grads = worker.backward(ctx, {"f": np.ones((2, 8), np.float32)})
  worker.apply(table_grads)
  after = stores["t"].lookup(np.array([5, 6], np.uint64), train=False)
  # ID 5 gets 1/2 from sample 0 and 1 from sample 1; ID 6 gets 1/2.
  np.testing.assert_allclose(after, rows - 0.1 * np.array([[1.5], [0.5]]), rtol=1e-5)


def test_concurrent_lookups_match_sequential():
  store_lib = pytest.importorskip("persia_jax.embedding.store")
  specs = [FeatureSpec("a", table="t", pooling="mean"), FeatureSpec("b", table="t")]
  store = store_lib.EmbeddingStore(8, optimizer={"name": "sgd", "learning_rate": 0.1})
  worker = EmbeddingWorker(specs, {"t": store}, wire_dtype="float16")
  rng = np.random.default_rng(3)
  batches = [{"a": _bags(rng, 5, 500), "b": _bags(rng, 5, 500)} for _ in range(8)]
  expected = [worker.lookup(batch, train=True)[0].values for batch in batches]
  results = [None] * len(batches)

  def run(index):
    results[index] = worker.lookup(batches[index], train=False)[0].values

  threads = [threading.Thread(target=run, args=(i,)) for i in range(len(batches))]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  for index, (got, want) in enumerate(zip(results, expected)):
    for name in ("a", "b"):
      np.testing.assert_array_equal(got[name], want[name], err_msg=f"{index} {name}")


# Bad input.


def test_error_lengths_mismatch_names_feature():
  worker = EmbeddingWorker(FEATURES, _stores())
  batch = _batch()
  batch["tags"] = types.SimpleNamespace(ids=batch["tags"].ids,
                                        lengths=batch["tags"].lengths + 1)
  with pytest.raises(ValueError, match="Feature 'tags': lengths sum to"):
    worker.lookup(batch, train=True)


def test_error_unknown_feature():
  worker = EmbeddingWorker(FEATURES, _stores())
  batch = _batch()
  batch["clicks"] = batch["tags"]
  with pytest.raises(KeyError, match="unknown features \\['clicks'\\]"):
    worker.lookup(batch, train=True)


def test_error_missing_feature():
  worker = EmbeddingWorker(FEATURES, _stores())
  batch = _batch()
  del batch["cart"]
  with pytest.raises(KeyError, match="missing features \\['cart'\\]"):
    worker.lookup(batch, train=True)


def test_error_table_without_store():
  with pytest.raises(ValueError, match="'ads', which has no store"):
    EmbeddingWorker([FeatureSpec("ad", table="ads")], _stores())


def test_error_none_pooling_with_two_ids_names_sample():
  worker = EmbeddingWorker(FEATURES, _stores())
  batch = _batch()
  lengths = np.ones(BATCH, np.int32)
  lengths[5] = 2
  lengths[6] = 0
  batch["user"] = SparseInput(np.arange(BATCH, dtype=np.uint64), lengths)
  with pytest.raises(ValueError, match="Feature 'user'.*sample 5 has 2 IDs"):
    worker.lookup(batch, train=True)


def test_error_batch_size_mismatch():
  worker = EmbeddingWorker(FEATURES, _stores())
  batch = _batch()
  batch["cart"] = SparseInput(np.zeros(1, np.uint64), np.ones(1, np.int32))
  with pytest.raises(ValueError, match="Feature 'cart' has batch size 1"):
    worker.lookup(batch, train=True)


def test_error_gradient_shape_names_feature():
  worker = EmbeddingWorker(FEATURES, _stores())
  _, ctx = worker.lookup(_batch(), train=True)
  grads = _random_grads(worker)
  grads["friends"] = grads["friends"][:, :2]
  with pytest.raises(ValueError, match="Feature 'friends': gradient has shape"):
    worker.backward(ctx, grads)


def test_error_gradient_missing_feature():
  worker = EmbeddingWorker(FEATURES, _stores())
  _, ctx = worker.lookup(_batch(), train=True)
  grads = _random_grads(worker)
  del grads["user"]
  with pytest.raises(KeyError, match="grads is missing features \\['user'\\]"):
    worker.backward(ctx, grads)


def test_error_apply_unknown_table():
  worker = EmbeddingWorker(FEATURES, _stores())
  with pytest.raises(KeyError, match="tables \\['ads'\\] have no store"):
    worker.apply({"ads": (np.zeros(1, np.uint64), np.zeros((1, 4), np.float32))})


# Specs from configs.


def test_specs_from_config_shared_table_and_defaults():
  tables, specs = features_lib.specs_from_config({
      "table_defaults": {"optimizer": {"name": "adagrad", "learning_rate": 0.05}},
      "tables": {"users": {"dim": 8}, "items": {"dim": 16, "num_shards": 2}},
      "features": {"user_id": {"table": "users", "pooling": "none"},
                   "items": {"pooling": "raw", "max_len": 5}},
  })
  assert [t.name for t in tables] == ["users", "items"]
  assert tables[1].num_shards == 2
  assert tables[0].optimizer == {"name": "adagrad", "learning_rate": 0.05}
  assert specs[1] == FeatureSpec("items", table="items", pooling="raw", max_len=5)


def test_specs_from_config_dict_accepts_configdict():
  ml_collections = pytest.importorskip("ml_collections")
  config = ml_collections.ConfigDict()
  config.embedding = ml_collections.ConfigDict({
      "tables": [{"name": "t", "dim": 4}],
      "features": [{"name": "f", "table": "t", "pooling": "sqrtn"}],
  })
  tables, specs = features_lib.specs_from_config(config)
  assert tables == [features_lib.TableSpec("t", dim=4)]
  assert specs == [FeatureSpec("f", table="t", pooling="sqrtn")]


def test_specs_from_config_errors():
  with pytest.raises(ValueError, match="Feature 'f' reads table 'missing'"):
    features_lib.specs_from_config({"tables": {"t": {"dim": 4}},
                                    "features": {"f": {"table": "missing"}}})
  with pytest.raises(ValueError, match="Table 't' has unknown fields \\['dims'\\]"):
    features_lib.specs_from_config({"tables": {"t": {"dims": 4}}, "features": {}})
  with pytest.raises(ValueError, match="pooling 'raw' needs max_len > 0"):
    FeatureSpec("f", table="t", pooling="raw")
  with pytest.raises(ValueError, match="pooling must be one of"):
    FeatureSpec("f", table="t", pooling="max")


def test_specs_from_config_default_table_pooling_and_capacity():
  tables, specs = features_lib.specs_from_config({
      "wire_dtype": "float16",
      "default_table": "shared",
      "default_pooling": "mean",
      "tables": {"shared": {"dim": 4, "capacity": 0}},
      "features": {"a": {}, "b": {"pooling": "sum"}},
  })
  assert tables[0].capacity is None
  assert specs[0] == FeatureSpec("a", table="shared", pooling="mean")
  assert specs[1] == FeatureSpec("b", table="shared", pooling="sum")


def test_load_stores_round_trip(tmp_path):
  pytest.importorskip("persia_jax.embedding.store")
  tables, _ = features_lib.specs_from_config({
      "tables": {"t": {"dim": 4, "num_shards": 2}}, "features": {}})
  stores = features_lib.build_stores(tables, seed=7)
  ids = np.array([3, 9, 27], np.uint64)
  rows = stores["t"].lookup(ids, train=True)
  stores["t"].save(str(tmp_path / "t"))
  loaded = features_lib.load_stores(tables, str(tmp_path))
  np.testing.assert_array_equal(loaded["t"].lookup(ids, train=False), rows)
  with pytest.raises(FileNotFoundError, match="No checkpoint for table 'u'"):
    features_lib.load_stores([features_lib.TableSpec("u", dim=4)], str(tmp_path))
