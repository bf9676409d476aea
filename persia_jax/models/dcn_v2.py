"""DCN-V2 (Wang et al. 2021, "DCN V2: Improved Deep & Cross Network and Practical
Lessons for Web-scale Learning to Rank Systems", arXiv 2008.13535).

The input x0 is the concatenation of the pooled embeddings (sorted by name) and
the dense features. Each cross layer computes x_{l+1} = x0 * (W x_l + b) + x_l
with a full-rank W, or with W = U V^T of rank r when `cross_low_rank` is r > 0.
The cross network and a deep MLP are either stacked (deep on top of cross) or
run in parallel on x0 with their outputs concatenated.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from persia_jax.models import layers

STRUCTURES = ("stacked", "parallel")


def default_config() -> ml_collections.ConfigDict:
  """Defaults: 3 full-rank cross layers stacked under a 1024-512-256 ReLU MLP.

  These are a reasonable starting point for Criteo-sized inputs (26 features of
  dim 16 plus 13 dense), not values tuned here.
  """
  return ml_collections.ConfigDict({
      "name": "dcn_v2",
      "num_cross_layers": 3,
      "cross_low_rank": 0,
      "structure": "stacked",
      "deep_mlp_sizes": (1024, 512, 256),
      "activation": "relu",
      "dropout_rate": 0.0,
      "output_bias_init": 0.0,
      "dtype": "float32",
  })


class CrossLayer(nn.Module):
  """One DCN-V2 cross layer: x0 * (W x + b) + x (Wang et al., arXiv 2008.13535).

  Parameters: with `low_rank` 0, `dense/kernel` [d, d] is W^T and `dense/bias` [d]
  is b. With `low_rank` r > 0, `down/kernel` [d, r] is V and `up/kernel` [r, d]
  is U^T, with bias `up/bias` [d].

  Attributes:
    low_rank: 0 for a full-rank W, else the rank r of W = U V^T.
    dtype: compute dtype; parameters are float32.
  """

  low_rank: int = 0
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x0: jax.Array, x: jax.Array) -> jax.Array:
    """Maps x0 and x, both [B, d], to x_{l+1} [B, d]."""
    width = x0.shape[-1]
    if self.low_rank > 0:
      projected = nn.Dense(self.low_rank, use_bias=False, dtype=self.dtype,
                           param_dtype=jnp.float32, kernel_init=layers.default_kernel_init,
                           name="down")(x)
      projected = nn.Dense(width, dtype=self.dtype, param_dtype=jnp.float32,
                           kernel_init=layers.default_kernel_init, name="up")(projected)
    else:
      projected = nn.Dense(width, dtype=self.dtype, param_dtype=jnp.float32,
                           kernel_init=layers.default_kernel_init, name="dense")(x)
    return x0 * projected + x


class DCNv2(nn.Module):
  """Deep & Cross Network V2 (Wang et al., arXiv 2008.13535).

  Attributes:
    feature_dims: (name, dim) pairs in sorted(name) order.
    num_dense: number of dense features.
    num_cross_layers: number of cross layers.
    cross_low_rank: 0 for full-rank cross layers, else the rank of each W.
    structure: "stacked" (deep MLP over the cross output) or "parallel"
      (cross and deep both over x0, outputs concatenated).
    deep_mlp_sizes: widths of the deep MLP.
    activation: hidden activation name.
    dropout_rate: dropout after each deep hidden layer while training.
    output_bias_init: initial bias of the logit.
    dtype: compute dtype; parameters are float32.
  """

  feature_dims: tuple[tuple[str, int], ...]
  num_dense: int
  num_cross_layers: int = 3
  cross_low_rank: int = 0
  structure: str = "stacked"
  deep_mlp_sizes: Sequence[int] = (1024, 512, 256)
  activation: str = "relu"
  dropout_rate: float = 0.0
  output_bias_init: float = 0.0
  dtype: layers.Dtype = jnp.float32

  def __post_init__(self):
    if self.structure not in STRUCTURES:
      raise ValueError(
          f"Invalid dcn_v2 structure {self.structure!r}; use one of {STRUCTURES}.")
    if self.num_cross_layers < 0 or self.cross_low_rank < 0:
      raise ValueError(
          f"dcn_v2 num_cross_layers ({self.num_cross_layers}) and cross_low_rank"
          f" ({self.cross_low_rank}) must be non-negative.")
    super().__post_init__()

  @nn.compact
  def __call__(self, dense: jax.Array, embeddings: Mapping[str, jax.Array],
               train: bool = False) -> jax.Array:
    """Returns float32 logits [B] from dense [B, num_dense] and embeddings {name: [B, dim]}."""
    layers.check_inputs(dense, embeddings, self.feature_dims, self.num_dense)
    x0 = layers.concat_inputs(dense, embeddings, self.feature_dims, self.dtype)
    cross = x0
    for i in range(self.num_cross_layers):
      cross = CrossLayer(self.cross_low_rank, dtype=self.dtype, name=f"cross_{i}")(x0, cross)
    deep = layers.MLP(self.deep_mlp_sizes, activation=self.activation,
                      dropout_rate=self.dropout_rate, dtype=self.dtype, name="deep_mlp")
    if self.structure == "stacked":
      x = deep(cross, train)
    else:
      x = jnp.concatenate([cross, deep(x0, train)], axis=-1)
    return layers.LogitHead(self.output_bias_init, name="logit")(x)
