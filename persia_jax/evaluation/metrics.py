"""Offline CTR metrics: ROC AUC, log loss, normalized entropy, calibration, staleness.

All functions take numpy or JAX arrays of shape [N] and optional non-negative
sample weights [N]; a weight of 0 marks padding, which every metric ignores.
Results are Python floats computed in float64.
"""

from __future__ import annotations

from typing import Sequence

from absl import logging
import numpy as np

# Probabilities are clipped to [EPS, 1 - EPS] before taking logs.
EPS = 1e-7


def _as_1d(values) -> np.ndarray:
  """Copies numpy or JAX values to a float64 numpy array and flattens it."""
  return np.asarray(values, dtype=np.float64).reshape(-1)


def _prepare(labels, predictions, weights) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Flattens the inputs to float64 [N], checks them and drops zero-weight rows."""
  labels = _as_1d(labels)
  predictions = _as_1d(predictions)
  if labels.shape != predictions.shape:
    raise ValueError(
        f"labels has {labels.shape[0]} elements but predictions has"
        f" {predictions.shape[0]}; pass one prediction per label.")
  if weights is None:
    weights = np.ones_like(labels)
  else:
    weights = _as_1d(weights)
    if weights.shape != labels.shape:
      raise ValueError(
          f"weights has {weights.shape[0]} elements but labels has {labels.shape[0]}.")
    if np.any(weights < 0) or np.any(~np.isfinite(weights)):
      bad = weights[(weights < 0) | ~np.isfinite(weights)][0]
      raise ValueError(f"Sample weights must be finite and >= 0, got {bad}.")
  keep = weights > 0
  labels, predictions, weights = labels[keep], predictions[keep], weights[keep]
  invalid = (labels != 0) & (labels != 1)
  if np.any(invalid):
    raise ValueError(
        f"Labels must be 0 or 1, got {labels[invalid][0]}; binarize labels before"
        " computing CTR metrics.")
  return labels, predictions, weights


def auc(labels, scores, weights=None) -> float:
  """Computes the exact weighted ROC AUC, with tied scores counting one half.

  The AUC is the weighted probability that a random positive scores higher than
  a random negative: sum over (positive i, negative j) of w_i w_j [s_i > s_j]
  plus half of w_i w_j [s_i == s_j], divided by (sum of positive weights) *
  (sum of negative weights). This equals the trapezoid rule over the ROC points
  of the distinct score thresholds. It runs in O(N log N).

  Args:
    labels: [N] 0/1 labels.
    scores: [N] scores of any monotone scale (probabilities or logits).
    weights: optional [N] sample weights >= 0; rows with weight 0 are ignored.

  Returns:
    The AUC in [0, 1]. It is NaN when only one class is present after
    dropping zero-weight rows, because the AUC is undefined then. It is also
    NaN, with a warning, when a score is NaN.
  """
  labels, scores, weights = _prepare(labels, scores, weights)
  if np.any(np.isnan(scores)):
    logging.warning("AUC is NaN because %d of %d scores are NaN.",
                    int(np.isnan(scores).sum()), scores.shape[0])
    return float("nan")
  positive_weight = weights * labels
  negative_weight = weights * (1.0 - labels)
  total_positive = positive_weight.sum()
  total_negative = negative_weight.sum()
  if total_positive <= 0 or total_negative <= 0:
    return float("nan")

  order = np.argsort(scores, kind="stable")
  sorted_scores = scores[order]
  # group[k] is the index of the distinct score of the k-th sorted sample.
  new_group = np.empty(sorted_scores.shape[0], bool)
  new_group[0] = True
  np.not_equal(sorted_scores[1:], sorted_scores[:-1], out=new_group[1:])
  group = np.cumsum(new_group) - 1
  num_groups = int(group[-1]) + 1
  positives = np.bincount(group, weights=positive_weight[order], minlength=num_groups)
  negatives = np.bincount(group, weights=negative_weight[order], minlength=num_groups)
  # Negative weight strictly below each group's score.
  negatives_below = np.cumsum(negatives) - negatives
  pairs = np.sum(positives * (negatives_below + 0.5 * negatives))
  return float(pairs / (total_positive * total_negative))


def _log_likelihood_terms(labels: np.ndarray, predictions: np.ndarray,
                          from_logits: bool) -> np.ndarray:
  """Returns the per-sample cross-entropy in nats."""
  if from_logits:
    # -log sigmoid(z) = logaddexp(0, -z), stable for large |z|.
    return labels * np.logaddexp(0.0, -predictions) + (1.0 - labels) * np.logaddexp(
        0.0, predictions)
  probs = np.clip(predictions, EPS, 1.0 - EPS)
  return -(labels * np.log(probs) + (1.0 - labels) * np.log1p(-probs))


def _probabilities(predictions: np.ndarray, from_logits: bool) -> np.ndarray:
  if not from_logits:
    return predictions
  return 0.5 * (1.0 + np.tanh(0.5 * predictions))  # sigmoid without overflow


def logloss(labels, predictions, weights=None, *, from_logits: bool = False) -> float:
  """Computes the weighted mean binary cross-entropy in nats.

  Args:
    labels: [N] 0/1 labels.
    predictions: [N] probabilities, clipped to [1e-7, 1 - 1e-7]; or logits when
      `from_logits`, evaluated with a stable log-sigmoid and no clipping.
    weights: optional [N] sample weights >= 0.
    from_logits: whether `predictions` are logits.

  Returns:
    sum(w * ce) / sum(w); NaN when no sample has a positive weight.
  """
  labels, predictions, weights = _prepare(labels, predictions, weights)
  if weights.sum() <= 0:
    return float("nan")
  terms = _log_likelihood_terms(labels, predictions, from_logits)
  return float(np.sum(weights * terms) / weights.sum())


def _binary_entropy(p: float) -> float:
  return float(-(p * np.log(p) + (1.0 - p) * np.log1p(-p)))


def normalized_entropy(labels, predictions, weights=None, *,
                       from_logits: bool = False) -> float:
  """Computes the log loss divided by the entropy of the observed CTR.

  Normalized entropy (He et al., "Practical Lessons from Predicting Clicks on
  Ads at Facebook", ADKDD 2014) is below 1 when the model beats always
  predicting the average CTR. Arguments are as for `logloss`.

  Returns:
    The ratio; NaN when the weighted CTR is 0 or 1 (the entropy is 0) or no
    sample has a positive weight.
  """
  labels, predictions, weights = _prepare(labels, predictions, weights)
  total = weights.sum()
  if total <= 0:
    return float("nan")
  ctr = float(np.sum(weights * labels) / total)
  if ctr <= 0.0 or ctr >= 1.0:
    return float("nan")
  terms = _log_likelihood_terms(labels, predictions, from_logits)
  return float(np.sum(weights * terms) / total) / _binary_entropy(ctr)


def calibration(labels, predictions, weights=None, *, from_logits: bool = False) -> float:
  """Computes the weighted mean predicted probability divided by the observed CTR.

  A calibrated model scores 1; above 1 it over-predicts clicks. Arguments are
  as for `logloss` (probabilities are not clipped here).

  Returns:
    The ratio; NaN when the observed CTR is 0 or no sample has a positive weight.
  """
  labels, predictions, weights = _prepare(labels, predictions, weights)
  observed = np.sum(weights * labels)
  if weights.sum() <= 0 or observed <= 0:
    return float("nan")
  predicted = np.sum(weights * _probabilities(predictions, from_logits))
  return float(predicted / observed)


class EvalAccumulator:
  """Collects (labels, logits, weights) over evaluation batches and computes metrics.

  Rows with weight 0 are dropped as they arrive, so padded batches cost no
  memory. The exact AUC needs every score, so memory grows as 3 float arrays
  of the number of real samples (about 20 bytes per sample).

  Example:
    accumulator = EvalAccumulator()
    for batch in eval_batches:
      accumulator.add(batch.labels, logits, batch.weights)
    metrics = accumulator.compute()
  """

  def __init__(self):
    self.reset()

  def reset(self) -> None:
    """Drops everything added so far."""
    self._labels: list[np.ndarray] = []
    self._logits: list[np.ndarray] = []
    self._weights: list[np.ndarray] = []

  def add(self, labels, logits, weights=None) -> None:
    """Adds one batch: labels [B] 0/1, logits [B], weights [B] (None means all 1).

    Accepts numpy or JAX arrays; JAX arrays are copied to host memory.
    """
    labels, logits, weights = _prepare(labels, logits, weights)
    self._labels.append(labels.astype(np.float32))
    self._logits.append(logits.astype(np.float32))
    self._weights.append(weights.astype(np.float32))

  @property
  def num_examples(self) -> int:
    """The number of samples with a positive weight added so far."""
    return sum(x.shape[0] for x in self._labels)

  def compute(self) -> dict[str, float]:
    """Returns auc, logloss, normalized_entropy, calibration, num_examples and ctr.

    The losses are computed from logits with a stable log-sigmoid, so they
    match `losses.sigmoid_cross_entropy`. Every float is NaN when no sample was
    added (num_examples is then 0).
    """
    if not self._labels:
      nan = float("nan")
      return {"auc": nan, "logloss": nan, "normalized_entropy": nan,
              "calibration": nan, "num_examples": 0, "ctr": nan}
    labels = np.concatenate(self._labels).astype(np.float64)
    logits = np.concatenate(self._logits).astype(np.float64)
    weights = np.concatenate(self._weights).astype(np.float64)
    return {
        "auc": auc(labels, logits, weights),
        "logloss": logloss(labels, logits, weights, from_logits=True),
        "normalized_entropy": normalized_entropy(labels, logits, weights, from_logits=True),
        "calibration": calibration(labels, logits, weights, from_logits=True),
        "num_examples": int(labels.shape[0]),
        "ctr": float(np.sum(weights * labels) / np.sum(weights)),
    }


def staleness_summary(values: Sequence[int] | np.ndarray) -> dict:
  """Summarizes gradient staleness, the number of updates a gradient lags behind.

  Args:
    values: non-negative integer staleness of each applied update.

  Returns:
    dict with mean (float), max (int), p50, p90 and p99 (ints: the smallest
    observed value whose empirical CDF reaches the quantile), and histogram
    {staleness: count} over the values that occur. With no values, mean and the
    percentiles are NaN, max is 0 and the histogram is empty.
  """
  array = np.asarray(values)
  if array.size == 0:
    nan = float("nan")
    return {"mean": nan, "max": 0, "p50": nan, "p90": nan, "p99": nan, "histogram": {}}
  if not np.issubdtype(array.dtype, np.integer):
    if not np.all(np.equal(np.mod(array, 1), 0)):
      raise ValueError("Staleness values must be integers, got non-integer values.")
    array = array.astype(np.int64)
  array = array.reshape(-1)
  if array.min() < 0:
    raise ValueError(f"Staleness values must be >= 0, got {int(array.min())}.")
  percentiles = np.percentile(array, [50, 90, 99], method="inverted_cdf")
  keys, counts = np.unique(array, return_counts=True)
  return {
      "mean": float(array.mean()),
      "max": int(array.max()),
      "p50": int(percentiles[0]),
      "p90": int(percentiles[1]),
      "p99": int(percentiles[2]),
      "histogram": {int(k): int(c) for k, c in zip(keys, counts)},
  }
