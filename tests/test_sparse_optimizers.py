"""Sparse optimizers of EmbeddingStore against the dense numpy reference.

The store updates float32 rows with float64 arithmetic per element; the
reference runs every step in float64. After five steps the two agree within
rtol=1e-5, atol=1e-6 (the difference is float32 rounding of rows and state).
"""

import numpy as np
import pytest

from persia_jax.embedding.optimizers import OptimizerSpec
from persia_jax.embedding.store import EmbeddingStore
from tests import numpy_reference

DIM = 6
VOCAB = 40
STEPS = 5
RTOL, ATOL = 1e-5, 1e-6

OPTIMIZERS = {
    "sgd": {"name": "sgd", "learning_rate": 0.1},
    "sgd_weight_decay": {"name": "sgd", "learning_rate": 0.1, "weight_decay": 0.3},
    "adagrad": {"name": "adagrad", "learning_rate": 0.05, "initial_accumulator": 0.1},
    "rowwise_adagrad": {"name": "rowwise_adagrad", "learning_rate": 0.05,
                        "initial_accumulator": 0.2},
    "adam": {"name": "adam", "learning_rate": 0.01, "beta1": 0.8, "beta2": 0.95,
             "epsilon": 1e-6},
    "ftrl": {"name": "ftrl", "learning_rate": 0.1, "ftrl_l1": 0.05, "ftrl_l2": 0.01,
             "ftrl_beta": 1.0},
    "ftrl_power": {"name": "ftrl", "learning_rate": 0.2, "learning_rate_power": -0.7,
                   "ftrl_beta": 0.5},
    "adagrad_bound": {"name": "adagrad", "learning_rate": 0.5, "weight_bound": 0.02},
}


def _vocabulary(seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  vocab = rng.integers(0, 2**64 - 1, VOCAB, dtype=np.uint64, endpoint=True)
  vocab[:2] = [0, 2**64 - 1]
  return np.unique(vocab)


def _batches(vocab_size: int, seed: int):
  """Yields (row indices with duplicates, float32 gradients) per step."""
  rng = np.random.default_rng(seed)
  for _ in range(STEPS):
    rows = rng.integers(0, vocab_size, 50)  # 50 draws from 40 IDs: many duplicates.
    grads = rng.normal(0.0, 1.0, (rows.size, DIM)).astype(np.float32)
    yield rows, grads


def _train(store: EmbeddingStore, vocab: np.ndarray, seed: int) -> None:
  store.lookup(vocab)  # Inserts every ID.
  for rows, grads in _batches(vocab.size, seed):
    store.apply_gradients(vocab[rows], grads)


@pytest.mark.parametrize("num_shards", [1, 4])
@pytest.mark.parametrize("config", sorted(OPTIMIZERS))
def test_optimizer_matches_reference(config, num_shards):
  optimizer = OPTIMIZERS[config]
  vocab = _vocabulary(0)
  store = EmbeddingStore(DIM, num_shards=num_shards, optimizer=optimizer,
                         init_scale=0.05, seed=3)
  reference = numpy_reference.DenseReference(
      numpy_reference.initial_values(vocab, 3, 0.05, DIM), optimizer)

  _train(store, vocab, seed=1)
  for rows, grads in _batches(vocab.size, seed=1):
    reference.step(rows, grads)

  np.testing.assert_allclose(store.lookup(vocab, train=False), reference.w,
                             rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("config", sorted(OPTIMIZERS))
def test_one_and_four_shards_equal(config):
  vocab = _vocabulary(1)
  stores = [EmbeddingStore(DIM, num_shards=k, optimizer=OPTIMIZERS[config], seed=5)
            for k in (1, 4)]
  for store in stores:
    _train(store, vocab, seed=2)
  # Duplicates are summed in arrival order in both layouts, so results are bitwise equal.
  np.testing.assert_array_equal(stores[0].lookup(vocab, train=False),
                                stores[1].lookup(vocab, train=False))


def test_weight_bound_clips_every_weight():
  vocab = _vocabulary(2)
  store = EmbeddingStore(DIM, optimizer=OPTIMIZERS["adagrad_bound"])
  _train(store, vocab, seed=3)
  values = store.lookup(vocab, train=False)
  assert np.max(np.abs(values)) <= 0.02


def test_nonfinite_gradient_skips_only_that_row():
  ids = np.array([1, 2, 3, 2], np.uint64)
  store = EmbeddingStore(4, optimizer={"name": "sgd", "learning_rate": 1.0})
  before = store.lookup(ids[:3]).copy()
  grads = np.ones((4, 4), np.float32)
  grads[1, 2] = np.nan  # ID 2: its summed gradient is NaN.
  grads[2, 0] = np.inf  # ID 3.

  store.apply_gradients(ids, grads)

  after = store.lookup(ids[:3], train=False)
  np.testing.assert_array_equal(after[0], before[0] - 1.0)
  np.testing.assert_array_equal(after[1], before[1])
  np.testing.assert_array_equal(after[2], before[2])
  assert store.stats()["nonfinite_gradients"] == 2
  assert store.stats()["updated_rows"] == 1


def test_duplicate_gradients_summed_once():
  store = EmbeddingStore(2, optimizer={"name": "adagrad", "learning_rate": 1.0,
                                       "initial_accumulator": 7.0, "epsilon": 0.0},
                         init_scale=0.0)
  ids = np.array([9, 9, 9], np.uint64)
  store.lookup(ids[:1])
  store.apply_gradients(ids, np.full((3, 2), 1.0, np.float32))
  # One update with g = 3: acc = 7 + 9, w = 0 - 3 / sqrt(16) = -0.75. Three
  # separate updates would give -(1/sqrt(8) + 1/sqrt(9) + 1/sqrt(10)) = -0.99.
  np.testing.assert_allclose(store.lookup(ids[:1], train=False), [[-0.75, -0.75]])


def test_adam_step_count_is_per_row():
  spec = {"name": "adam", "learning_rate": 0.1, "beta1": 0.5, "beta2": 0.5, "epsilon": 0.0}
  store = EmbeddingStore(1, optimizer=spec, init_scale=0.0)
  store.lookup(np.array([1, 2], np.uint64))
  store.apply_gradients(np.array([1], np.uint64), np.array([[1.0]], np.float32))
  store.apply_gradients(np.array([1, 2], np.uint64), np.array([[1.0], [1.0]], np.float32))
  # Bias correction makes every step with a constant gradient move the row by
  # lr * sign(g), because m_hat / sqrt(v_hat) stays 1. Row 1 moved twice, row 2 once.
  np.testing.assert_allclose(store.lookup(np.array([1, 2], np.uint64), train=False),
                             [[-0.2], [-0.1]], rtol=1e-6)


def test_spec_roundtrip_and_validation():
  spec = OptimizerSpec(name="ftrl", ftrl_l1=0.5)
  assert OptimizerSpec.from_dict(spec.to_dict()) == spec
  with pytest.raises(ValueError, match="Unknown sparse optimizer 'lamb'"):
    OptimizerSpec(name="lamb")
  with pytest.raises(ValueError, match="learning_rate must be > 0, got -1"):
    OptimizerSpec(learning_rate=-1)
  with pytest.raises(ValueError, match="Unknown OptimizerSpec fields"):
    OptimizerSpec.from_dict({"name": "sgd", "momentum": 0.9})


@pytest.mark.parametrize("name,width", [("sgd", 0), ("adagrad", 8), ("rowwise_adagrad", 1),
                                        ("adam", 17), ("ftrl", 16)])
def test_slot_width(name, width):
  assert OptimizerSpec(name=name).slot_width(8) == width
