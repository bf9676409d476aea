"""Tests of the embedding worker's numba kernels against plain numpy and jax.grad."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from persia_jax.embedding import pooling

DIM = 5


def _random_bags(seed, batch=41, max_len=6, vocab=30):
  """Variable-length bags with empty samples and repeated IDs."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(0, max_len + 1, size=batch).astype(np.int32)
  lengths[[0, 7]] = 0  # At least two empty samples.
  ids = rng.integers(0, vocab, size=int(lengths.sum())).astype(np.uint64)
  offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  return ids, lengths, offsets


def _reference_pool(rows_by_id, ids, offsets, mode):
  batch = offsets.shape[0] - 1
  out = np.zeros((batch, DIM), np.float64)
  for b in range(batch):
    bag = ids[offsets[b]:offsets[b + 1]]
    if bag.size == 0:
      continue
    total = sum(rows_by_id[i].astype(np.float64) for i in bag)
    if mode == "mean":
      total = total / bag.size
    elif mode == "sqrtn":
      total = total / np.sqrt(bag.size)
    out[b] = total
  return out


def _reference_backward(grads, ids, offsets, mode):
  table = {}
  for b in range(offsets.shape[0] - 1):
    bag = ids[offsets[b]:offsets[b + 1]]
    scale = {"sum": 1.0, "none": 1.0, "mean": 1.0 / max(bag.size, 1),
             "sqrtn": 1.0 / np.sqrt(max(bag.size, 1))}[mode]
    for i in bag:
      table[int(i)] = table.get(int(i), 0.0) + scale * grads[b].astype(np.float64)
  return table


@pytest.mark.parametrize("method", ["hash", "sort"])
def test_dedup_inverse_restores_ids(method):
  ids, _, _ = _random_bags(0)
  unique, inverse = pooling.DEDUP_METHODS[method](ids)
  np.testing.assert_array_equal(unique[inverse], ids)


@pytest.mark.parametrize("method", ["hash", "sort"])
def test_dedup_unique_has_each_id_once(method):
  ids, _, _ = _random_bags(1)
  unique, _ = pooling.DEDUP_METHODS[method](ids)
  np.testing.assert_array_equal(np.sort(unique), np.unique(ids))


def test_dedup_hash_first_occurrence_order():
  ids = np.array([7, 3, 7, 2**64 - 1, 0, 3, 0], np.uint64)
  unique, inverse = pooling.dedup_hash(ids)
  np.testing.assert_array_equal(unique, np.array([7, 3, 2**64 - 1, 0], np.uint64))
  np.testing.assert_array_equal(inverse, [0, 1, 0, 2, 3, 1, 3])


def test_dedup_hash_empty():
  unique, inverse = pooling.dedup_hash(np.zeros(0, np.uint64))
  assert unique.shape == (0,)
  assert inverse.shape == (0,)


@pytest.mark.parametrize("mode", ["none", "sum", "mean", "sqrtn"])
def test_pool_forward_matches_numpy(mode):
  ids, lengths, offsets = _random_bags(2)
  if mode == "none":
    lengths = np.ones_like(lengths)
    offsets = np.arange(lengths.shape[0] + 1, dtype=np.int64)
    ids = ids[:lengths.shape[0]]
  unique, inverse = pooling.dedup_hash(ids)
  rng = np.random.default_rng(3)
  rows = rng.normal(size=(unique.shape[0], DIM)).astype(np.float32)
  rows_by_id = dict(zip(unique.tolist(), rows))
  out = np.full((lengths.shape[0], DIM), np.nan, np.float32)
  clamped, nans = pooling.pool_forward(rows, inverse, offsets,
                                       pooling.POOLING_MODES[mode], np.inf, out)
  np.testing.assert_allclose(out, _reference_pool(rows_by_id, ids, offsets, mode),
                             rtol=1e-5, atol=1e-6)
  assert clamped == 0
  assert nans == 0


def test_pool_forward_empty_sample_is_zero():
  ids, lengths, offsets = _random_bags(4)
  unique, inverse = pooling.dedup_hash(ids)
  rows = np.ones((unique.shape[0], DIM), np.float32)
  out = np.full((lengths.shape[0], DIM), np.nan, np.float32)
  pooling.pool_forward(rows, inverse, offsets, pooling.POOL_MEAN, np.inf, out)
  np.testing.assert_array_equal(out[lengths == 0], 0.0)


@pytest.mark.parametrize("mode", ["none", "sum", "mean", "sqrtn"])
def test_pool_backward_matches_numpy(mode):
  ids, lengths, offsets = _random_bags(5)
  if mode == "none":
    lengths = np.ones_like(lengths)
    offsets = np.arange(lengths.shape[0] + 1, dtype=np.int64)
    ids = ids[:lengths.shape[0]]
  unique, inverse = pooling.dedup_hash(ids)
  grads = np.random.default_rng(6).normal(size=(lengths.shape[0], DIM)).astype(np.float32)
  table_grads = np.zeros((unique.shape[0], DIM), np.float32)
  nonfinite = pooling.pool_backward(grads, inverse, offsets,
                                    pooling.POOLING_MODES[mode], table_grads)
  reference = _reference_backward(grads, ids, offsets, mode)
  expected = np.stack([reference[int(i)] for i in unique])
  np.testing.assert_allclose(table_grads, expected, rtol=1e-5, atol=1e-6)
  assert nonfinite == 0


@pytest.mark.parametrize("mode", ["sum", "mean", "sqrtn"])
def test_pool_backward_matches_jax_grad(mode):
  ids, lengths, offsets = _random_bags(7)
  unique, inverse = pooling.dedup_sort(ids)
  rng = np.random.default_rng(8)
  rows = rng.normal(size=(unique.shape[0], DIM)).astype(np.float32)
  upstream = rng.normal(size=(lengths.shape[0], DIM)).astype(np.float32)
  segments = np.repeat(np.arange(lengths.shape[0]), lengths)
  safe_lengths = np.maximum(lengths, 1).astype(np.float32)
  scale = {"sum": np.ones_like(safe_lengths), "mean": 1.0 / safe_lengths,
           "sqrtn": 1.0 / np.sqrt(safe_lengths)}[mode]

  def loss(table_rows):
    gathered = table_rows[inverse] * scale[segments][:, None]
    pooled = jax.ops.segment_sum(gathered, segments, num_segments=lengths.shape[0])
    return jnp.sum(pooled * upstream)

  expected = jax.grad(loss)(jnp.asarray(rows))
  table_grads = np.zeros_like(rows)
  pooling.pool_backward(upstream, inverse, offsets, pooling.POOLING_MODES[mode],
                        table_grads)
  np.testing.assert_allclose(table_grads, np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_raw_forward_truncates_and_masks():
  ids, lengths, _ = _random_bags(9)
  max_len = 3
  keep, offsets = pooling.truncate_positions(lengths, max_len)
  kept = ids[keep]
  unique, inverse = pooling.dedup_hash(kept)
  rows = np.random.default_rng(10).normal(size=(unique.shape[0], DIM)).astype(np.float32)
  rows_by_id = dict(zip(unique.tolist(), rows))
  out = np.full((lengths.shape[0], max_len, DIM), np.nan, np.float32)
  mask = np.full((lengths.shape[0], max_len), np.nan, np.float32)
  pooling.pool_raw_forward(rows, inverse, offsets, np.inf, out, mask)

  expected = np.zeros_like(out)
  expected_mask = np.zeros_like(mask)
  full_offsets = np.concatenate([[0], np.cumsum(lengths)])
  for b in range(lengths.shape[0]):
    bag = ids[full_offsets[b]:full_offsets[b + 1]][:max_len]
    for k, i in enumerate(bag):
      expected[b, k] = rows_by_id[int(i)]
      expected_mask[b, k] = 1.0
  np.testing.assert_array_equal(out, expected)
  np.testing.assert_array_equal(mask, expected_mask)


def test_raw_backward_matches_numpy():
  ids, lengths, _ = _random_bags(11)
  max_len = 4
  keep, offsets = pooling.truncate_positions(lengths, max_len)
  kept = ids[keep]
  unique, inverse = pooling.dedup_hash(kept)
  grads = np.random.default_rng(12).normal(
      size=(lengths.shape[0], max_len, DIM)).astype(np.float32)
  table_grads = np.zeros((unique.shape[0], DIM), np.float32)
  pooling.pool_raw_backward(grads, inverse, offsets, table_grads)

  expected = {}
  full_offsets = np.concatenate([[0], np.cumsum(lengths)])
  for b in range(lengths.shape[0]):
    for k, i in enumerate(ids[full_offsets[b]:full_offsets[b + 1]][:max_len]):
      expected[int(i)] = expected.get(int(i), 0.0) + grads[b, k].astype(np.float64)
  np.testing.assert_allclose(table_grads, np.stack([expected[int(i)] for i in unique]),
                             rtol=1e-5, atol=1e-6)


def test_pool_forward_clamps_and_counts():
  rows = np.array([[1e5, -1e5, 1.0, np.nan, np.inf]], np.float32)
  inverse = np.zeros(1, np.int32)
  offsets = np.array([0, 1], np.int64)
  out = np.zeros((1, DIM), np.float32)
  clamped, nans = pooling.pool_forward(rows, inverse, offsets, pooling.POOL_SUM,
                                       pooling.FLOAT16_MAX, out)
  np.testing.assert_array_equal(out[0, [0, 1, 2, 4]], [65504.0, -65504.0, 1.0, 65504.0])
  assert np.isnan(out[0, 3])
  assert clamped == 3
  assert nans == 1


def test_pool_backward_counts_nonfinite():
  grads = np.array([[np.inf, 1, 1, 1, 1], [np.nan, 1, 1, 1, 1]], np.float32)
  inverse = np.zeros(1, np.int32)
  offsets = np.array([0, 1, 1], np.int64)  # The second sample is empty.
  table_grads = np.zeros((1, DIM), np.float32)
  nonfinite = pooling.pool_backward(grads, inverse, offsets, pooling.POOL_SUM, table_grads)
  assert nonfinite == 1
