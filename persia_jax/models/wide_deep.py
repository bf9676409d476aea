"""Wide & Deep (Cheng et al. 2016, "Wide & Deep Learning for Recommender Systems",
arXiv 1606.07792).

The logit is the sum of a wide linear part and a deep MLP. The paper's wide part
is a linear model over sparse IDs and their cross-product transformations. The
embedding store keeps one table per feature, so here the wide part is a linear
map over the dense features and the pooled embeddings. The deep part is an MLP
over the same concatenation.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from persia_jax.models import layers


def default_config() -> ml_collections.ConfigDict:
  """Defaults: the paper's 1024-512-256 ReLU deep part."""
  return ml_collections.ConfigDict({
      "name": "wide_deep",
      "deep_mlp_sizes": (1024, 512, 256),
      "activation": "relu",
      "dropout_rate": 0.0,
      "output_bias_init": 0.0,
      "dtype": "float32",
  })


class WideDeep(nn.Module):
  """Wide linear part plus deep MLP (Cheng et al., arXiv 1606.07792).

  Attributes:
    feature_dims: (name, dim) pairs in sorted(name) order.
    num_dense: number of dense features.
    deep_mlp_sizes: hidden widths of the deep part before its logit.
    activation: hidden activation name.
    dropout_rate: dropout after each deep hidden layer while training.
    output_bias_init: initial bias of the deep logit.
    dtype: compute dtype; parameters are float32.
  """

  feature_dims: tuple[tuple[str, int], ...]
  num_dense: int
  deep_mlp_sizes: Sequence[int] = (1024, 512, 256)
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
    wide = nn.Dense(1, dtype=jnp.float32, param_dtype=jnp.float32,
                    kernel_init=layers.default_kernel_init, name="wide")(x.astype(jnp.float32))
    deep = layers.MLP(self.deep_mlp_sizes, activation=self.activation,
                      dropout_rate=self.dropout_rate, dtype=self.dtype,
                      name="deep_mlp")(x, train)
    return wide[:, 0] + layers.LogitHead(self.output_bias_init, name="logit")(deep)
