"""DeepFM (Guo et al. 2017, "DeepFM: A Factorization-Machine based Neural Network
for CTR Prediction", arXiv 1703.04247).

The logit is the sum of three terms over the same field embeddings:
  * first order: the paper gives each ID its own scalar weight. The embedding
    store keeps one table per feature, so this model uses a learned linear
    projection of each pooled embedding to a scalar instead (one Dense(1) over
    the concatenated embeddings, which is the sum of per-feature projections),
    plus a linear term over the dense features;
  * second order (FM): sum over field pairs i < j of <v_i, v_j>, computed in
    O(F d) as 0.5 * sum_k ((sum_i v_ik)^2 - sum_i v_ik^2);
  * deep: an MLP over the concatenated field embeddings.
With `dense_as_fm_fields`, each dense feature x_i also becomes a field with
embedding x_i * w_i for a learned vector w_i, as factorization machines treat
real-valued inputs.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from persia_jax.models import layers


def default_config() -> ml_collections.ConfigDict:
  """Defaults: a 400-400-400 ReLU deep part, as in the DeepFM paper's Criteo runs.

  The paper also uses dropout 0.5 there. The default here is 0 so that training
  does not need a "dropout" PRNG stream; set dropout_rate to follow the paper.
  """
  return ml_collections.ConfigDict({
      "name": "deepfm",
      "deep_mlp_sizes": (400, 400, 400),
      "dense_as_fm_fields": True,
      "activation": "relu",
      "dropout_rate": 0.0,
      "output_bias_init": 0.0,
      "dtype": "float32",
  })


def fm_interaction(fields: jax.Array) -> jax.Array:
  """Returns the FM second-order term sum_{i<j} <v_i, v_j> per sample.

  Args:
    fields: [B, F, d] field embeddings.

  Returns:
    float32 [B]. The sum is taken in float32 because the difference of squares
    cancels badly in bfloat16.
  """
  fields = fields.astype(jnp.float32)
  square_of_sum = jnp.square(jnp.sum(fields, axis=1))
  sum_of_squares = jnp.sum(jnp.square(fields), axis=1)
  return 0.5 * jnp.sum(square_of_sum - sum_of_squares, axis=-1)


class DeepFM(nn.Module):
  """DeepFM: first-order + FM second-order + deep MLP (Guo et al., arXiv 1703.04247).

  Attributes:
    feature_dims: (name, dim) pairs in sorted(name) order; all dims must match.
    num_dense: number of dense features.
    deep_mlp_sizes: hidden widths of the deep part before its logit.
    dense_as_fm_fields: turn each dense feature into an FM field.
    activation: hidden activation name.
    dropout_rate: dropout after each deep hidden layer while training.
    output_bias_init: initial bias of the deep logit, the model's only bias
      apart from the first-order term's.
    dtype: compute dtype; parameters are float32.
  """

  feature_dims: tuple[tuple[str, int], ...]
  num_dense: int
  deep_mlp_sizes: Sequence[int] = (400, 400, 400)
  dense_as_fm_fields: bool = True
  activation: str = "relu"
  dropout_rate: float = 0.0
  output_bias_init: float = 0.0
  dtype: layers.Dtype = jnp.float32

  def __post_init__(self):
    layers.equal_dim("deepfm", self.feature_dims)
    super().__post_init__()

  @nn.compact
  def __call__(self, dense: jax.Array, embeddings: Mapping[str, jax.Array],
               train: bool = False) -> jax.Array:
    """Returns float32 logits [B] from dense [B, num_dense] and embeddings {name: [B, dim]}."""
    batch = layers.check_inputs(dense, embeddings, self.feature_dims, self.num_dense)
    dim = layers.equal_dim("deepfm", self.feature_dims)
    vectors = layers.ordered_embeddings(embeddings, self.feature_dims, self.dtype)
    dense = dense.astype(self.dtype)

    # First order in float32: it is a single linear map and adds directly to the logit.
    first_order = nn.Dense(1, dtype=jnp.float32, param_dtype=jnp.float32,
                           kernel_init=layers.default_kernel_init, name="first_order")(
                               jnp.concatenate(vectors + [dense], axis=-1).astype(jnp.float32))

    fields = jnp.stack(vectors, axis=1)
    if self.num_dense > 0 and self.dense_as_fm_fields:
      dense_field_embedding = self.param(
          "dense_field_embedding", nn.initializers.normal(stddev=0.01),
          (self.num_dense, dim), jnp.float32)
      dense_fields = dense[:, :, None] * dense_field_embedding.astype(self.dtype)[None]
      fields = jnp.concatenate([fields, dense_fields], axis=1)
    second_order = fm_interaction(fields)

    deep_inputs = fields.reshape(batch, -1)
    if self.num_dense > 0 and not self.dense_as_fm_fields:
      deep_inputs = jnp.concatenate([deep_inputs, dense], axis=-1)
    deep = layers.MLP(self.deep_mlp_sizes, activation=self.activation,
                      dropout_rate=self.dropout_rate, dtype=self.dtype,
                      name="deep_mlp")(deep_inputs, train)
    deep_logit = layers.LogitHead(self.output_bias_init, name="logit")(deep)
    return first_order[:, 0] + second_order + deep_logit
