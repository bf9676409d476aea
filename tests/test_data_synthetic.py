"""Tests of the synthetic source: determinism, skew, the hidden model's AUC, Criteo files."""

import numpy as np
import pytest
from scipy import stats

from persia_jax.data import build_input, criteo_config, hashing, synthetic_config
from persia_jax.data.synthetic import SyntheticSource, write_criteo_file, zipf_ranks


def rank_auc(labels, scores):
  """AUC from the Mann-Whitney U statistic, with scipy's tie-averaged ranks."""
  labels = np.asarray(labels) > 0.5
  ranks = stats.rankdata(scores)
  positives = labels.sum()
  negatives = len(labels) - positives
  return (ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives)


def small_config(**synthetic):
  config = synthetic_config(block_size=4096)
  config.synthetic.update(dict(num_samples=20_000, num_test_samples=8192,
                               ceiling_samples=60_000, num_categorical=6, num_dense=4,
                               vocab_size=50_000, num_multi_value=2, max_length=5))
  config.synthetic.update(synthetic)
  return config


def test_generation_is_deterministic():
  first, first_logits, _ = SyntheticSource(small_config()).generate("train", 3)
  second, second_logits, _ = SyntheticSource(small_config()).generate("train", 3)
  np.testing.assert_array_equal(first.labels, second.labels)
  np.testing.assert_array_equal(first.sparse["cat_0"][0], second.sparse["cat_0"][0])
  np.testing.assert_array_equal(first_logits, second_logits)


def test_data_seed_changes_samples():
  first, _, _ = SyntheticSource(small_config(data_seed=0)).generate("train", 0)
  second, _, _ = SyntheticSource(small_config(data_seed=1)).generate("train", 0)
  assert not np.array_equal(first.sparse["cat_0"][0], second.sparse["cat_0"][0])


def test_ids_are_hashed_ranks():
  chunk, _, ranks = SyntheticSource(small_config()).generate("train", 0, 100)
  expected = [hashing.feature_id("cat_2", str(r)) for r in ranks["cat_2"]]
  assert [int(x) for x in chunk.sparse["cat_2"][0]] == expected


def test_zipf_rank_frequencies():
  exponent, vocab = 1.2, 1_000_000
  u = np.random.default_rng(0).random(2_000_000)
  ranks = zipf_ranks(u, vocab, exponent)
  # P(rank = r) = (G(r + 2) - G(r + 1)) / (G(V + 1) - G(1)) with G(x) = x^(1 - s).
  r = np.arange(5)
  power = 1.0 - exponent
  expected = (((r + 2.0) ** power - (r + 1.0) ** power)
              / ((vocab + 1.0) ** power - 1.0))
  observed = np.bincount(ranks, minlength=5)[:5] / len(u)
  np.testing.assert_allclose(observed, expected, rtol=0.02)


def test_billions_of_ids():
  vocab = 5_000_000_000
  ranks = zipf_ranks(np.random.default_rng(1).random(100_000), vocab, 0.3)
  assert ranks.min() >= 0
  assert ranks.max() < vocab
  assert ranks.max() > 2**32


def test_multi_hot_lengths_in_range():
  chunk, _, _ = SyntheticSource(small_config(max_length=5)).generate("train", 0)
  lengths = chunk.sparse["multi_1"][1]
  assert lengths.min() == 1
  assert lengths.max() == 5
  assert chunk.sparse["multi_1"][0].shape[0] == lengths.sum()


def test_reported_ceiling_reached_by_hidden_model():
  source = SyntheticSource(small_config())
  ceiling = source.auc_ceiling()
  chunk, logits, _ = source.generate("test", 0, 60_000)
  assert rank_auc(chunk.labels, logits) == pytest.approx(ceiling, abs=0.01)


def test_noisy_model_stays_below_ceiling():
  source = SyntheticSource(small_config())
  chunk, logits, _ = source.generate("test", 0, 60_000)
  noisy = logits + np.random.default_rng(0).standard_normal(logits.shape) * 1.0
  assert rank_auc(chunk.labels, noisy) < source.auc_ceiling() - 0.02


def test_ceiling_auc_helper_matches_scipy_ranks():
  source = SyntheticSource(small_config(ceiling_samples=5000))
  chunk, logits, _ = source.generate("ceiling", 0, 4096)
  chunk_2, logits_2, _ = source.generate("ceiling", 1, 904)
  labels = np.concatenate([chunk.labels, chunk_2.labels])
  scores = np.concatenate([logits, logits_2])
  assert source.auc_ceiling() == pytest.approx(rank_auc(labels, scores), abs=1e-12)


def test_build_input_split_sizes():
  with build_input(small_config(), split="train", batch_size=3000) as iterator:
    train = sum(b.size for b in iterator)
  with build_input(small_config(), split="test", batch_size=3000) as iterator:
    test = sum(b.size for b in iterator)
  assert (train, test) == (20_000, 8192)


@pytest.mark.parametrize("process_count", [2, 3])
def test_process_split_covers_samples_once(process_count):
  config = small_config()
  config.shuffle = False
  full = np.concatenate([
      SyntheticSource(config).generate("train", b, min(4096, 20_000 - 4096 * b))[0].sparse["cat_0"][0]
      for b in range(5)])
  seen = []
  for process_index in range(process_count):
    with build_input(config, split="train", batch_size=1000, process_index=process_index,
                     process_count=process_count) as iterator:
      seen.append(np.concatenate([b.sparse["cat_0"].ids for b in iterator]))
  merged = np.concatenate(seen)
  assert len(merged) == 20_000
  np.testing.assert_array_equal(np.sort(merged), np.sort(full))


def test_resume_synthetic_stream():
  config = small_config(num_samples=None)
  with build_input(config, split="train", batch_size=1000, seed=4) as iterator:
    expected = [next(iterator).labels for _ in range(12)]
  with build_input(config, split="train", batch_size=1000, seed=4) as iterator:
    for _ in range(5):
      next(iterator)
    state = iterator.state_dict()
  with build_input(config, split="train", batch_size=1000, seed=4) as iterator:
    iterator.load_state_dict(state)
    tail = [next(iterator).labels for _ in range(7)]
  np.testing.assert_array_equal(np.concatenate(tail), np.concatenate(expected[5:]))


def test_write_criteo_file_round_trip(tmp_path):
  path = tmp_path / "synthetic.txt"
  write_criteo_file(str(path), 3000, block_rows=1024)
  config = criteo_config(files=str(path), test_fraction=0.0, shuffle=False)
  with build_input(config, split="train", batch_size=10_000) as iterator:
    batch = next(iterator)
  lines = path.read_text().splitlines()
  assert batch.size == 3000
  assert batch.labels.tolist() == [float(line[0]) for line in lines]
  first = lines[0].split("\t")
  assert len(first) == 40
  assert int(batch.sparse["C3"].ids[0]) == hashing.feature_id("C3", first[3 + 13])
