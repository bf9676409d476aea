"""The feed-forward tower of the PERSIA paper (Lian et al., KDD 2022, arXiv 2111.05897).

The pooled embeddings, in sorted(name) order, are concatenated with the dense
features and fed through a ReLU MLP, default 4096-2048-1024-512-256, then one
logit.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from persia_jax.models import layers


def default_config() -> ml_collections.ConfigDict:
  """Defaults: the PERSIA paper's 4096-2048-1024-512-256 ReLU tower."""
  return ml_collections.ConfigDict({
      "name": "dnn",
      "hidden_sizes": (4096, 2048, 1024, 512, 256),
      "activation": "relu",
      "dropout_rate": 0.0,
      "output_bias_init": 0.0,
      "dtype": "float32",
  })


class DNN(nn.Module):
  """Concatenated embeddings and dense features through an MLP (PERSIA, arXiv 2111.05897).

  Attributes:
    feature_dims: (name, dim) pairs in sorted(name) order.
    num_dense: number of dense features.
    hidden_sizes: widths of the hidden layers.
    activation: hidden activation name.
    dropout_rate: dropout after each hidden layer while training.
    output_bias_init: initial bias of the logit.
    dtype: compute dtype; parameters are float32.
  """

  feature_dims: tuple[tuple[str, int], ...]
  num_dense: int
  hidden_sizes: Sequence[int] = (4096, 2048, 1024, 512, 256)
  activation: str = "relu"
  dropout_rate: float = 0.0
  output_bias_init: float = 0.0
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, dense: jax.Array, embeddings: Mapping[str, jax.Array],
               train: bool = False) -> jax.Array:
    """Returns float32 logits [B] from dense [B, num_dense] and embeddings {name: [B, dim]}."""
    layers.check_inputs(dense, embeddings, self.feature_dims, self.num_dense)
    x = layers.concat_inputs(dense, embeddings, self.feature_dims, self.dtype)
    x = layers.MLP(self.hidden_sizes, activation=self.activation,
                   dropout_rate=self.dropout_rate, dtype=self.dtype, name="mlp")(x, train)
    return layers.LogitHead(self.output_bias_init, name="logit")(x)
