"""Training losses for click-through-rate models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def sigmoid_cross_entropy(logits: jax.Array, labels: jax.Array,
                          weights: jax.Array | None = None) -> jax.Array:
  """Returns the weighted mean binary cross-entropy of logits against 0/1 labels.

  Args:
    logits: [B] logits of any float dtype; the loss is computed in float32.
    labels: [B] labels in [0, 1].
    weights: [B] non-negative sample weights, 1 for real samples and 0 for
      padding; None weighs every sample 1.

  Returns:
    float32 scalar sum(w * ce) / sum(w). It is 0 (with zero gradient) when the
    weights sum to 0, e.g. for an all-padding batch, rather than NaN.
  """
  logits = jnp.asarray(logits, jnp.float32)
  labels = jnp.asarray(labels, jnp.float32)
  if logits.shape != labels.shape:
    raise ValueError(
        f"logits shape {logits.shape} and labels shape {labels.shape} must match.")
  per_sample = optax.sigmoid_binary_cross_entropy(logits, labels)
  if weights is None:
    return jnp.mean(per_sample)
  weights = jnp.asarray(weights, jnp.float32)
  if weights.shape != labels.shape:
    raise ValueError(
        f"weights shape {weights.shape} and labels shape {labels.shape} must match.")
  total_weight = jnp.sum(weights)
  # The max keeps the division finite so the unused branch has no NaN gradient.
  safe_total = jnp.maximum(total_weight, jnp.finfo(jnp.float32).tiny)
  return jnp.where(total_weight > 0, jnp.sum(weights * per_sample) / safe_total, 0.0)
