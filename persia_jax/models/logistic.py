"""Logistic regression over hashed features: the usual CTR baseline.

With embedding dim 1 every hashed ID has one weight, which is a logistic
regression over one-hot (hashed) categorical features. A linear map over the
dense features and a bias complete it. For a dim above 1 the components of a
row are summed, which is the same model with the weight split over `dim`
parameters.
"""

from __future__ import annotations

from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from persia_jax.models import layers


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"name": "logistic", "dtype": "float32"})


class LogisticRegression(nn.Module):
  """Sum of ID weights plus a linear map of the dense features.

  Attributes:
    feature_dims: (name, dim) pairs in sorted(name) order.
    num_dense: number of dense features.
    dtype: compute dtype; parameters are float32.
  """

  feature_dims: tuple[tuple[str, int], ...]
  num_dense: int
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, dense: jax.Array, embeddings: Mapping[str, jax.Array],
               train: bool = False) -> jax.Array:
    """Returns float32 logits [B] from dense [B, num_dense] and embeddings {name: [B, dim]}."""
    del train
    layers.check_inputs(dense, embeddings, self.feature_dims, self.num_dense)
    ids_term = sum(e.astype(jnp.float32).sum(axis=-1)
                   for e in layers.ordered_embeddings(embeddings, self.feature_dims,
                                                      jnp.float32))
    dense_term = nn.Dense(1, dtype=jnp.float32, param_dtype=jnp.float32,
                          kernel_init=nn.initializers.zeros, name="dense")(
                              dense.astype(jnp.float32))[:, 0]
    return ids_term + dense_term
