"""The model zoo: dense towers that map dense features and pooled embeddings to logits.

Every model is a Flax linen module called as

  logits = model.apply({"params": params}, dense, embeddings, train=False)

with dense float32 [B, num_dense], embeddings a dict from sparse feature name to
its pooled embedding [B, dim] (float32, float16 or bfloat16), and logits float32
[B]. Features are consumed in sorted(name) order. `model_config.dtype` sets the
compute dtype ("float32" or "bfloat16"); parameters are always float32.
"""

from __future__ import annotations

from typing import Callable, Mapping

import flax.linen as nn
import ml_collections

from persia_jax.models import dcn_v2
from persia_jax.models import deepfm
from persia_jax.models import dlrm
from persia_jax.models import dnn
from persia_jax.models import layers
from persia_jax.models import logistic
from persia_jax.models import losses  # noqa: F401  (re-exported)
from persia_jax.models import wide_deep

# name -> (module class, default config factory).
_REGISTRY: dict[str, tuple[type[nn.Module], Callable[[], ml_collections.ConfigDict]]] = {
    "dnn": (dnn.DNN, dnn.default_config),
    "dlrm": (dlrm.DLRM, dlrm.default_config),
    "dcn_v2": (dcn_v2.DCNv2, dcn_v2.default_config),
    "deepfm": (deepfm.DeepFM, deepfm.default_config),
    "wide_deep": (wide_deep.WideDeep, wide_deep.default_config),
    "logistic": (logistic.LogisticRegression, logistic.default_config),
}

MODEL_NAMES = tuple(_REGISTRY)

# Config fields holding layer widths, converted to tuples of ints.
_SIZE_FIELDS = ("hidden_sizes", "bottom_mlp_sizes", "top_mlp_sizes", "deep_mlp_sizes")


def _lookup(name: str):
  if name not in _REGISTRY:
    raise ValueError(f"Unknown model name {name!r}; set model.name to one of {MODEL_NAMES}.")
  return _REGISTRY[name]


def default_model_config(name: str) -> ml_collections.ConfigDict:
  """Returns the documented default hyperparameters of model `name`, including `name`."""
  return _lookup(name)[1]()


def build_model(model_config: ml_collections.ConfigDict | Mapping, *,
                feature_dims: Mapping[str, int], num_dense: int) -> nn.Module:
  """Builds the model that `model_config.name` selects.

  Args:
    model_config: `name` plus any of the model's hyperparameters (see
      `default_model_config(name)`); fields left out take their defaults.
    feature_dims: sparse feature name -> dim of its pooled embedding.
    num_dense: number of dense features (0 is allowed).

  Returns:
    An unbound Flax module; call `init` / `apply` with (dense, embeddings, train).

  Raises:
    ValueError: for an unknown name or field, an invalid value, or (dlrm,
      deepfm) embedding dims that differ.
  """
  config = dict(model_config)
  if "name" not in config:
    raise ValueError(f"model_config has no 'name'; set it to one of {MODEL_NAMES}.")
  name = config.pop("name")
  module_cls, defaults_fn = _lookup(name)
  defaults = defaults_fn().to_dict()
  defaults.pop("name")
  unknown = sorted(set(config) - set(defaults))
  if unknown:
    raise ValueError(
        f"Unknown fields {unknown} for model {name!r}; valid fields are {sorted(defaults)}.")
  kwargs = {**defaults, **config}
  for field in _SIZE_FIELDS:
    if field in kwargs:
      kwargs[field] = layers.as_int_tuple(f"model.{field}", kwargs[field])
  kwargs["dtype"] = layers.compute_dtype(kwargs["dtype"])
  if "activation" in kwargs:
    layers.activation_fn(kwargs["activation"])
  if not 0.0 <= float(kwargs.get("dropout_rate", 0.0)) < 1.0:
    raise ValueError(f"model.dropout_rate must be in [0, 1), got {kwargs['dropout_rate']}.")
  if not feature_dims:
    raise ValueError("feature_dims is empty; every model needs at least one sparse feature.")
  if num_dense < 0:
    raise ValueError(f"num_dense must be >= 0, got {num_dense}.")
  return module_cls(feature_dims=layers.sorted_feature_dims(feature_dims),
                    num_dense=int(num_dense), **kwargs)
