"""DLRM (Naumov et al. 2019, "Deep Learning Recommendation Model for Personalization
and Recommendation Systems", arXiv 1906.00091).

A bottom MLP maps the dense features to a vector of the embedding dim. The
pairwise dot products between that vector and the pooled embeddings (strict upper
triangle, so each pair once) are concatenated with the bottom output and fed
through the top MLP to one logit.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from persia_jax.models import layers


def default_config() -> ml_collections.ConfigDict:
  """Defaults: the DLRM Criteo setup, bottom 512-256-64-dim and top 512-256-1.

  `bottom_mlp_sizes` lists the hidden widths only. The model appends a final
  bottom layer of the embedding dim itself, so with dim 16 the bottom MLP is
  13-512-256-64-16, as in the DLRM paper's Criteo Kaggle runs.
  """
  return ml_collections.ConfigDict({
      "name": "dlrm",
      "bottom_mlp_sizes": (512, 256, 64),
      "top_mlp_sizes": (512, 256),
      "interaction_itself": False,
      "activation": "relu",
      "dropout_rate": 0.0,
      "output_bias_init": 0.0,
      "dtype": "float32",
  })


def dot_interaction(vectors: jax.Array, itself: bool = False) -> jax.Array:
  """Returns the pairwise dot products of F vectors per sample.

  Args:
    vectors: [B, F, d].
    itself: whether to include each vector's dot product with itself (the
      diagonal); DLRM's default leaves it out.

  Returns:
    [B, F * (F - 1) / 2] (or F * (F + 1) / 2 with `itself`): the entries (i, j),
    i < j (or i <= j), of vectors @ vectors^T in row-major order.
  """
  num_vectors = vectors.shape[1]
  gram = jnp.einsum("bfd,bgd->bfg", vectors, vectors)
  rows, cols = np.triu_indices(num_vectors, k=0 if itself else 1)
  flat_index = rows * num_vectors + cols
  return gram.reshape(gram.shape[0], num_vectors * num_vectors)[:, flat_index]


class DLRM(nn.Module):
  """DLRM with dot-product interaction (Naumov et al., arXiv 1906.00091).

  Attributes:
    feature_dims: (name, dim) pairs in sorted(name) order; all dims must match.
    num_dense: number of dense features; with 0 there is no bottom MLP and the
      interaction covers the embeddings only.
    bottom_mlp_sizes: hidden widths of the bottom MLP; a last layer of the
      embedding dim is appended.
    top_mlp_sizes: hidden widths of the top MLP before the logit.
    interaction_itself: include each vector's self dot product.
    activation: hidden activation name; the bottom output is activated too, as
      in the reference implementation.
    dropout_rate: dropout after each top hidden layer while training.
    output_bias_init: initial bias of the logit.
    dtype: compute dtype; parameters are float32.
  """

  feature_dims: tuple[tuple[str, int], ...]
  num_dense: int
  bottom_mlp_sizes: Sequence[int] = (512, 256, 64)
  top_mlp_sizes: Sequence[int] = (512, 256)
  interaction_itself: bool = False
  activation: str = "relu"
  dropout_rate: float = 0.0
  output_bias_init: float = 0.0
  dtype: layers.Dtype = jnp.float32

  def __post_init__(self):
    # Fail when the model is built rather than on its first call.
    layers.equal_dim("dlrm", self.feature_dims)
    super().__post_init__()

  @nn.compact
  def __call__(self, dense: jax.Array, embeddings: Mapping[str, jax.Array],
               train: bool = False) -> jax.Array:
    """Returns float32 logits [B] from dense [B, num_dense] and embeddings {name: [B, dim]}."""
    layers.check_inputs(dense, embeddings, self.feature_dims, self.num_dense)
    dim = layers.equal_dim("dlrm", self.feature_dims)
    vectors = layers.ordered_embeddings(embeddings, self.feature_dims, self.dtype)
    top_inputs = []
    if self.num_dense > 0:
      bottom = layers.MLP(tuple(self.bottom_mlp_sizes) + (dim,), activation=self.activation,
                          dtype=self.dtype, name="bottom_mlp")(dense.astype(self.dtype))
      vectors = [bottom] + vectors
      top_inputs.append(bottom)
    interactions = dot_interaction(jnp.stack(vectors, axis=1), self.interaction_itself)
    x = jnp.concatenate(top_inputs + [interactions], axis=-1)
    x = layers.MLP(self.top_mlp_sizes, activation=self.activation,
                   dropout_rate=self.dropout_rate, dtype=self.dtype, name="top_mlp")(x, train)
    return layers.LogitHead(self.output_bias_init, name="logit")(x)
