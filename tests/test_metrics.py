"""Tests for CTR metrics against brute-force and hand-computed values."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from persia_jax.evaluation import metrics


def brute_force_auc(labels, scores, weights=None):
  """O(n^2) weighted AUC by its definition over (positive, negative) pairs."""
  labels = np.asarray(labels, np.float64)
  scores = np.asarray(scores, np.float64)
  weights = np.ones_like(labels) if weights is None else np.asarray(weights, np.float64)
  numerator = 0.0
  denominator = 0.0
  for i in range(len(labels)):
    for j in range(len(labels)):
      if labels[i] == 1 and labels[j] == 0:
        pair_weight = weights[i] * weights[j]
        denominator += pair_weight
        if scores[i] > scores[j]:
          numerator += pair_weight
        elif scores[i] == scores[j]:
          numerator += 0.5 * pair_weight
  return numerator / denominator


def test_auc_hand_example():
  # Of the 4 (positive, negative) pairs, only (0.35, 0.4) is misordered: 3 / 4.
  assert metrics.auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)


def test_auc_tie_counts_half():
  # Pairs: (0.5 vs 0.5) tie = 0.5, (0.5 vs 0.2) = 1; total 1.5 / 2.
  assert metrics.auc([1, 0, 0], [0.5, 0.5, 0.2]) == pytest.approx(0.75)


def test_auc_all_scores_tied_is_half():
  assert metrics.auc([0, 1, 0, 1, 1], [0.3] * 5) == pytest.approx(0.5)


def test_auc_perfect_and_inverted():
  assert metrics.auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == pytest.approx(1.0)
  assert metrics.auc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == pytest.approx(0.0)


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_brute_force_with_ties(seed):
  rng = np.random.default_rng(seed)
  n = 200
  labels = rng.integers(0, 2, n)
  scores = rng.integers(0, 15, n) / 15.0  # Few distinct values, so many ties.
  assert metrics.auc(labels, scores) == pytest.approx(brute_force_auc(labels, scores), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_brute_force_with_weights(seed):
  rng = np.random.default_rng(100 + seed)
  n = 150
  labels = rng.integers(0, 2, n)
  scores = rng.integers(0, 10, n).astype(np.float64)
  weights = rng.uniform(0.0, 3.0, n)
  weights[rng.random(n) < 0.2] = 0.0
  expected = brute_force_auc(labels, scores, weights)
  assert metrics.auc(labels, scores, weights) == pytest.approx(expected, abs=1e-12)


def test_auc_integer_weights_equal_repeated_rows():
  labels = np.array([0, 1, 0, 1, 1])
  scores = np.array([0.2, 0.3, 0.6, 0.6, 0.1])
  weights = np.array([2, 1, 3, 1, 2])
  repeated = metrics.auc(np.repeat(labels, weights), np.repeat(scores, weights))
  assert metrics.auc(labels, scores, weights) == pytest.approx(repeated, abs=1e-12)


def test_auc_ignores_padding():
  labels = [0, 1, 1, 0]
  scores = [0.1, 0.7, 0.2, 0.5]
  padded = metrics.auc(labels + [1, 1, 0], scores + [0.0, -5.0, 9.0], [1, 1, 1, 1, 0, 0, 0])
  assert padded == pytest.approx(metrics.auc(labels, scores))


def test_auc_one_class_is_nan():
  assert math.isnan(metrics.auc([1, 1, 1], [0.2, 0.5, 0.9]))


def test_auc_one_class_after_padding_is_nan():
  assert math.isnan(metrics.auc([1, 0, 1], [0.2, 0.5, 0.9], [1, 0, 1]))


def test_auc_nan_score_is_nan():
  assert math.isnan(metrics.auc([0, 1], [0.2, float("nan")]))


def test_auc_accepts_jax_arrays():
  got = metrics.auc(jnp.array([0, 0, 1, 1]), jnp.array([0.1, 0.4, 0.35, 0.8]))
  assert got == pytest.approx(0.75)


def test_auc_rejects_non_binary_labels():
  with pytest.raises(ValueError, match="Labels must be 0 or 1, got 2"):
    metrics.auc([0, 2, 1], [0.1, 0.2, 0.3])


def test_auc_rejects_negative_weights():
  with pytest.raises(ValueError, match="got -1"):
    metrics.auc([0, 1], [0.1, 0.2], [1.0, -1.0])


def test_auc_rejects_length_mismatch():
  with pytest.raises(ValueError, match="labels has 2 elements but predictions has 3"):
    metrics.auc([0, 1], [0.1, 0.2, 0.3])


def test_logloss_hand_values():
  expected = -(math.log(0.8) + math.log(0.6)) / 2
  assert metrics.logloss([1, 0], [0.8, 0.4]) == pytest.approx(expected)


def test_logloss_weighted():
  expected = -(3 * math.log(0.8) + 1 * math.log(0.6)) / 4
  assert metrics.logloss([1, 0, 1], [0.8, 0.4, 0.01], [3, 1, 0]) == pytest.approx(expected)


def test_logloss_clips_probabilities():
  assert metrics.logloss([1], [0.0]) == pytest.approx(-math.log(1e-7))
  assert metrics.logloss([0], [1.0]) == pytest.approx(-math.log(1e-7), rel=1e-6)


def test_logloss_from_logits_matches_probabilities():
  logits = np.array([-2.0, 0.3, 1.5])
  probs = 1.0 / (1.0 + np.exp(-logits))
  labels = [0, 1, 1]
  assert metrics.logloss(labels, logits, from_logits=True) == pytest.approx(
      metrics.logloss(labels, probs))


def test_logloss_from_extreme_logits_is_finite():
  assert metrics.logloss([1], [-1000.0], from_logits=True) == pytest.approx(1000.0)


def test_normalized_entropy_hand_values():
  labels = [1, 0, 0, 0]
  probs = [0.5, 0.2, 0.1, 0.3]
  loss = -(math.log(0.5) + math.log(0.8) + math.log(0.9) + math.log(0.7)) / 4
  ctr_entropy = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
  assert metrics.normalized_entropy(labels, probs) == pytest.approx(loss / ctr_entropy)


def test_normalized_entropy_of_ctr_predictor_is_one():
  labels = [1, 0, 0, 0]
  assert metrics.normalized_entropy(labels, [0.25] * 4) == pytest.approx(1.0)


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1, 1]])
def test_normalized_entropy_nan_for_constant_labels(labels):
  assert math.isnan(metrics.normalized_entropy(labels, [0.2, 0.3, 0.4]))


def test_calibration_hand_values():
  # Mean prediction 1.1 / 4 over observed CTR 1 / 4.
  assert metrics.calibration([1, 0, 0, 0], [0.5, 0.2, 0.1, 0.3]) == pytest.approx(1.1)


def test_calibration_weighted_from_logits():
  logits = np.array([0.0, math.log(3.0)])  # probabilities 0.5 and 0.75
  # Weighted mean prediction (2 * 0.5 + 0.75) / 3 over weighted CTR 1 / 3.
  got = metrics.calibration([0, 1], logits, [2, 1], from_logits=True)
  assert got == pytest.approx((2 * 0.5 + 0.75) / 1.0)


def test_calibration_nan_without_positives():
  assert math.isnan(metrics.calibration([0, 0], [0.2, 0.3]))


def test_accumulator_matches_functions_on_concatenation():
  rng = np.random.default_rng(7)
  accumulator = metrics.EvalAccumulator()
  kept_labels, kept_logits = [], []
  for _ in range(3):
    labels = rng.integers(0, 2, 16).astype(np.float32)
    logits = rng.normal(size=16).astype(np.float32)
    weights = np.ones(16, np.float32)
    weights[12:] = 0.0  # padding
    accumulator.add(jnp.asarray(labels), jnp.asarray(logits), weights)
    kept_labels.append(labels[:12])
    kept_logits.append(logits[:12])
  labels = np.concatenate(kept_labels)
  logits = np.concatenate(kept_logits)
  result = accumulator.compute()
  assert result["num_examples"] == 36
  assert result["ctr"] == pytest.approx(labels.mean())
  assert result["auc"] == pytest.approx(brute_force_auc(labels, logits), abs=1e-12)
  assert result["logloss"] == pytest.approx(metrics.logloss(labels, logits, from_logits=True))
  assert result["normalized_entropy"] == pytest.approx(
      metrics.normalized_entropy(labels, logits, from_logits=True))
  assert result["calibration"] == pytest.approx(
      metrics.calibration(labels, logits, from_logits=True))


def test_accumulator_empty_is_nan():
  result = metrics.EvalAccumulator().compute()
  assert result["num_examples"] == 0
  assert math.isnan(result["auc"])
  assert math.isnan(result["logloss"])


def test_accumulator_reset():
  accumulator = metrics.EvalAccumulator()
  accumulator.add([0, 1], [0.0, 1.0])
  accumulator.reset()
  assert accumulator.num_examples == 0


def test_staleness_summary_hand_values():
  summary = metrics.staleness_summary([0, 1, 1, 2, 5])
  assert summary["mean"] == pytest.approx(1.8)
  assert summary["max"] == 5
  assert summary["p50"] == 1
  assert summary["p90"] == 5
  assert summary["p99"] == 5
  assert summary["histogram"] == {0: 1, 1: 2, 2: 1, 5: 1}


def test_staleness_summary_percentiles_of_range():
  # Values 0..99: the smallest v with at least q of the values <= v is 49, 89, 98.
  summary = metrics.staleness_summary(np.arange(100))
  assert (summary["p50"], summary["p90"], summary["p99"]) == (49, 89, 98)


def test_staleness_summary_empty():
  summary = metrics.staleness_summary([])
  assert summary["histogram"] == {}
  assert math.isnan(summary["mean"])


def test_staleness_summary_rejects_negative():
  with pytest.raises(ValueError, match="got -2"):
    metrics.staleness_summary([1, -2])
