"""Tests of the embedding worker's wire compression to float16 and bfloat16."""

import ml_dtypes
import numpy as np
import pytest

from persia_jax.data.batch import SparseInput
from persia_jax.embedding.features import FeatureSpec
from persia_jax.embedding.worker import EmbeddingWorker


class FixedStore:
  """A store whose row for ID i is `table[i]`; records applied gradients."""

  def __init__(self, table):
    self.table = np.asarray(table, np.float32)
    self.dim = self.table.shape[1]

  def lookup(self, ids, *, train=True, out=None):
    del train
    rows = self.table[ids.astype(np.int64)]
    if out is None:
      return rows
    out[...] = rows
    return out

  def apply_gradients(self, ids, grads):
    raise NotImplementedError

  def stats(self):
    return {}

  def save(self, path):
    raise NotImplementedError

  def restore(self, path):
    raise NotImplementedError

  def state_spec(self):
    return {"dim": self.dim}


def _worker(table, wire_dtype, pooling="sum"):
  return EmbeddingWorker([FeatureSpec("f", table="t", pooling=pooling)],
                         {"t": FixedStore(table)}, wire_dtype=wire_dtype)


def _one_hot(ids):
  return {"f": SparseInput.one_hot(np.asarray(ids, np.uint64))}


@pytest.mark.parametrize("wire_dtype,expected", [
    ("float32", np.float32), ("float16", np.float16), ("bfloat16", ml_dtypes.bfloat16)])
def test_activation_dtype(wire_dtype, expected):
  worker = _worker(np.ones((3, 4)), wire_dtype)
  activations, _ = worker.lookup(_one_hot([0, 1, 2]), train=True)
  assert activations.values["f"].dtype == np.dtype(expected)


def test_float16_clamps_out_of_range_and_counts():
  table = np.array([[1e5, -1e5, 65504.0, 1.5],
                    [7e4, 0.25, -65520.0, np.finfo(np.float32).max]], np.float32)
  worker = _worker(table, "float16")
  activations, _ = worker.lookup(_one_hot([0, 1]), train=True)
  expected = np.array([[65504, -65504, 65504, 1.5],
                       [65504, 0.25, -65504, 65504]], np.float16)
  np.testing.assert_array_equal(activations.values["f"], expected)
  assert not np.isinf(activations.values["f"]).any()
  assert worker.stats()["clamped_values"] == 5  # All but 65504.0, 1.5 and 0.25.


def test_float16_clamps_pooled_sum_not_rows():
  # Each row fits float16 but their sum does not.
  table = np.array([[40000.0], [40000.0]], np.float32)
  worker = _worker(table, "float16")
  bags = {"f": SparseInput(np.array([0, 1], np.uint64), np.array([2], np.int32))}
  activations, _ = worker.lookup(bags, train=True)
  assert activations.values["f"][0, 0] == np.float16(65504)
  assert worker.stats()["clamped_values"] == 1


def test_float16_nan_stays_nan_and_counts():
  table = np.array([[np.nan, 1.0], [2.0, 3.0]], np.float32)
  worker = _worker(table, "float16")
  activations, _ = worker.lookup(_one_hot([0, 1]), train=True)
  assert np.isnan(activations.values["f"][0, 0])
  assert worker.stats()["nan_values"] == 1
  assert worker.stats()["clamped_values"] == 0


def test_bfloat16_clamps_overflowing_values():
  big = np.finfo(np.float32).max
  table = np.array([[big, -big, 1.0]], np.float32)
  worker = _worker(table, "bfloat16")
  activations, _ = worker.lookup(_one_hot([0]), train=True)
  values = activations.values["f"].astype(np.float32)
  assert np.isfinite(values).all()
  assert worker.stats()["clamped_values"] == 2


def test_float32_wire_does_not_clamp():
  table = np.array([[1e5, np.inf]], np.float32)
  worker = _worker(table, "float32")
  activations, _ = worker.lookup(_one_hot([0]), train=True)
  np.testing.assert_array_equal(activations.values["f"], table)
  assert worker.stats()["clamped_values"] == 0


@pytest.mark.parametrize("wire_dtype,tolerance", [("float16", 2**-11), ("bfloat16", 2**-8)])
def test_compressed_activation_within_rounding(wire_dtype, tolerance):
  rng = np.random.default_rng(0)
  table = rng.normal(size=(50, 8)).astype(np.float32)
  lengths = rng.integers(0, 5, 30).astype(np.int32)
  ids = rng.integers(0, 50, int(lengths.sum())).astype(np.uint64)
  bags = {"f": SparseInput(ids, lengths)}
  exact, _ = _worker(table, "float32", "mean").lookup(bags, train=True)
  compressed, _ = _worker(table, wire_dtype, "mean").lookup(bags, train=True)
  reference = exact.values["f"]
  error = np.abs(compressed.values["f"].astype(np.float32) - reference)
  assert np.all(error <= tolerance * np.abs(reference) + 1e-30)


@pytest.mark.parametrize("wire_dtype,grad_dtype", [
    ("float16", np.float16), ("bfloat16", ml_dtypes.bfloat16)])
def test_backward_casts_gradients_to_float32(wire_dtype, grad_dtype):
  rng = np.random.default_rng(1)
  table = rng.normal(size=(20, 4)).astype(np.float32)
  lengths = rng.integers(0, 4, 16).astype(np.int32)
  ids = rng.integers(0, 20, int(lengths.sum())).astype(np.uint64)
  bags = {"f": SparseInput(ids, lengths)}
  grads = rng.normal(size=(16, 4)).astype(grad_dtype)

  compressed = _worker(table, wire_dtype, "sqrtn")
  _, ctx = compressed.lookup(bags, train=True)
  got_ids, got = compressed.backward(ctx, {"f": grads})["t"]

  exact = _worker(table, "float32", "sqrtn")
  _, ctx32 = exact.lookup(bags, train=True)
  want_ids, want = exact.backward(ctx32, {"f": grads.astype(np.float32)})["t"]
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got_ids, want_ids)
  np.testing.assert_array_equal(got, want)


def test_backward_counts_nonfinite_gradients():
  worker = _worker(np.ones((2, 2)), "float16")
  _, ctx = worker.lookup(_one_hot([0, 1]), train=True)
  grads = np.array([[np.inf, 1], [1, np.nan]], np.float16)
  worker.backward(ctx, {"f": grads})
  assert worker.stats()["nonfinite_gradients"] == 2
