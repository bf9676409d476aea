"""Building blocks shared by the model zoo: input checks, feature ordering, MLP.

Every model takes the same two inputs: dense float32 [B, num_dense] and a dict
from sparse feature name to its pooled embedding [B, dim]. Models consume the
embeddings in sorted(name) order, so the parameter layout does not depend on
dict insertion order.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = Any

# Glorot normal kernels and zero biases. The DLRM reference code (dlrm_s_pytorch.py)
# draws its MLP weights at the same Glorot scale.
default_kernel_init = nn.initializers.glorot_normal()

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": nn.relu,
    "gelu": nn.gelu,
    "silu": nn.silu,
    "tanh": jnp.tanh,
}


def compute_dtype(name: str) -> Dtype:
  """Maps a config string ("float32" or "bfloat16") to the jnp compute dtype."""
  if name not in COMPUTE_DTYPES:
    raise ValueError(
        f"Invalid model dtype {name!r}; set model.dtype to one of"
        f" {sorted(COMPUTE_DTYPES)}.")
  return COMPUTE_DTYPES[name]


def activation_fn(name: str) -> Callable[[Array], Array]:
  if name not in ACTIVATIONS:
    raise ValueError(
        f"Invalid activation {name!r}; use one of {sorted(ACTIVATIONS)}.")
  return ACTIVATIONS[name]


def sorted_feature_dims(feature_dims: Mapping[str, int]) -> tuple[tuple[str, int], ...]:
  """Returns (name, dim) pairs in sorted(name) order, checking every dim is positive.

  Models store this tuple rather than a dict because Flax module fields must be
  hashable and the order must be fixed.
  """
  pairs = []
  for name in sorted(feature_dims):
    dim = int(feature_dims[name])
    if dim <= 0:
      raise ValueError(
          f"Embedding dim of feature {name!r} is {dim}; every dim must be positive.")
    pairs.append((name, dim))
  return tuple(pairs)


def check_inputs(dense: Array, embeddings: Mapping[str, Array],
                 feature_dims: Sequence[tuple[str, int]], num_dense: int) -> int:
  """Checks input shapes against the model's configuration; returns the batch size.

  The checks run at trace time on static shapes, so they cost nothing under jit.
  """
  if dense.ndim != 2 or dense.shape[1] != num_dense:
    raise ValueError(
        f"dense has shape {dense.shape} but the model was built for"
        f" [batch, {num_dense}]; pass num_dense matching the data.")
  batch = dense.shape[0]
  expected = {name for name, _ in feature_dims}
  missing = sorted(expected - set(embeddings))
  unexpected = sorted(set(embeddings) - expected)
  if missing or unexpected:
    raise ValueError(
        f"Embedding features do not match the model: missing {missing},"
        f" unexpected {unexpected}; build the model with the same feature_dims"
        " as the embedding store.")
  for name, dim in feature_dims:
    shape = embeddings[name].shape
    if shape != (batch, dim):
      raise ValueError(
          f"Embedding of feature {name!r} has shape {shape}, expected"
          f" ({batch}, {dim}) for batch size {batch} and dim {dim}.")
  return batch


def ordered_embeddings(embeddings: Mapping[str, Array],
                       feature_dims: Sequence[tuple[str, int]],
                       dtype: Dtype) -> list[Array]:
  """Returns the embeddings in sorted(name) order, cast to the compute dtype."""
  return [jnp.asarray(embeddings[name]).astype(dtype) for name, _ in feature_dims]


def concat_inputs(dense: Array, embeddings: Mapping[str, Array],
                  feature_dims: Sequence[tuple[str, int]], dtype: Dtype) -> Array:
  """Returns [B, sum(dims) + num_dense]: embeddings in sorted(name) order, then dense."""
  return jnp.concatenate(ordered_embeddings(embeddings, feature_dims, dtype)
                         + [dense.astype(dtype)], axis=-1)


def equal_dim(model_name: str, feature_dims: Sequence[tuple[str, int]]) -> int:
  """Returns the common embedding dim, raising if the features differ in dim."""
  dims = {dim for _, dim in feature_dims}
  if len(dims) != 1:
    raise ValueError(
        f"{model_name} needs every embedding dim to be equal because it takes"
        f" inner products between embeddings, got {dict(feature_dims)}; give"
        " every feature the same dim or use dnn, dcn_v2 or wide_deep.")
  return dims.pop()


class MLP(nn.Module):
  """A stack of Dense layers with an activation after each hidden layer.

  Attributes:
    features: output width of each layer.
    activation: name in ACTIVATIONS.
    activate_final: whether the last layer is followed by the activation too.
    dropout_rate: dropout after each activated layer while training; needs a
      "dropout" PRNG stream when positive.
    dtype: compute dtype; parameters stay float32.
  """

  features: Sequence[int]
  activation: str = "relu"
  activate_final: bool = True
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    act = activation_fn(self.activation)
    for i, width in enumerate(self.features):
      x = nn.Dense(width, dtype=self.dtype, param_dtype=jnp.float32,
                   kernel_init=default_kernel_init, name=f"dense_{i}")(x)
      if i < len(self.features) - 1 or self.activate_final:
        x = act(x)
        if self.dropout_rate > 0:
          x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return x


class LogitHead(nn.Module):
  """The final Dense(1), computed in float32 so logits keep full precision.

  Attributes:
    bias_init: initial bias, e.g. log(ctr / (1 - ctr)) of the training data so
      the first steps do not spend updates learning the base rate.
  """

  bias_init: float = 0.0

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Maps [B, d] to float32 logits [B]."""
    logit = nn.Dense(1, dtype=jnp.float32, param_dtype=jnp.float32,
                     kernel_init=default_kernel_init,
                     bias_init=nn.initializers.constant(self.bias_init), name="dense")(
                         x.astype(jnp.float32))
    return logit[:, 0]


def as_int_tuple(name: str, values: Any) -> tuple[int, ...]:
  """Converts a config list of layer widths to a tuple, checking each is positive."""
  if isinstance(values, (int, np.integer)):
    values = (values,)
  result = tuple(int(v) for v in values)
  if any(v <= 0 for v in result):
    raise ValueError(f"{name} must hold positive layer widths, got {values!r}.")
  return result
