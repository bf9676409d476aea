"""Tests for the model zoo: shapes, numpy references of each forward pass, dtypes, loss."""

import itertools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from persia_jax import models
from persia_jax.models import dcn_v2
from persia_jax.models import deepfm
from persia_jax.models import dlrm
from persia_jax.models import losses

FEATURE_DIMS = {"c": 4, "a": 4, "b": 4}  # Unsorted on purpose.
NUM_DENSE = 3

TINY_CONFIGS = {
    "dnn": {"hidden_sizes": (8, 4)},
    "dlrm": {"bottom_mlp_sizes": (8,), "top_mlp_sizes": (6,)},
    "dcn_v2": {"num_cross_layers": 2, "deep_mlp_sizes": (8,)},
    "deepfm": {"deep_mlp_sizes": (8,)},
    "wide_deep": {"deep_mlp_sizes": (8,)},
    "logistic": {},
}


def tiny_model(name, dtype="float32", feature_dims=None, **overrides):
  config = models.default_model_config(name)
  config.update(TINY_CONFIGS[name])
  config.update(overrides)
  config.dtype = dtype
  return models.build_model(config, feature_dims=feature_dims or FEATURE_DIMS,
                            num_dense=NUM_DENSE)


def make_inputs(batch, feature_dims=None, seed=0, emb_dtype=np.float32):
  rng = np.random.default_rng(seed)
  dense = rng.normal(size=(batch, NUM_DENSE)).astype(np.float32)
  embeddings = {name: rng.normal(size=(batch, dim)).astype(emb_dtype)
                for name, dim in (feature_dims or FEATURE_DIMS).items()}
  return dense, embeddings


def init_params(model, dense, embeddings, seed=0):
  """Initializes, then adds noise so biases are nonzero and the references test them."""
  params = model.init(jax.random.key(seed), dense, embeddings)["params"]
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [leaf + 0.1 * jax.random.normal(key, leaf.shape) for leaf, key in zip(leaves, keys)]
  return jax.tree.unflatten(treedef, leaves)


def to_numpy(params):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), flax.core.unfreeze(params))


def param_shapes(params):
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
  return {key: tuple(value.shape) for key, value in flat.items()}


# Plain numpy forward passes, written from the papers' equations.


def np_dense(x, p):
  return x @ p["kernel"] + p["bias"]


def np_mlp(x, p, num_layers, activate_final=True):
  for i in range(num_layers):
    x = np_dense(x, p[f"dense_{i}"])
    if i < num_layers - 1 or activate_final:
      x = np.maximum(x, 0.0)
  return x


def np_logit(x, p):
  return np_dense(x, p["logit"]["dense"])[:, 0]


def np_sorted_concat(dense, embeddings):
  return np.concatenate([embeddings[k] for k in sorted(embeddings)] + [dense], axis=1)


def np_dnn(p, dense, embeddings):
  return np_logit(np_mlp(np_sorted_concat(dense, embeddings), p["mlp"], 2), p)


def np_dlrm(p, dense, embeddings):
  bottom = np_mlp(dense, p["bottom_mlp"], 2)
  vectors = [bottom] + [embeddings[k] for k in sorted(embeddings)]
  pairs = [np.sum(vectors[i] * vectors[j], axis=1)
           for i, j in itertools.combinations(range(len(vectors)), 2)]
  top_input = np.concatenate([bottom, np.stack(pairs, axis=1)], axis=1)
  return np_logit(np_mlp(top_input, p["top_mlp"], 1), p)


def np_cross(x0, x, p):
  if "dense" in p:
    return x0 * np_dense(x, p["dense"]) + x
  return x0 * np_dense(x @ p["down"]["kernel"], p["up"]) + x


def np_dcn(p, dense, embeddings, structure="stacked", num_cross=2):
  x0 = np_sorted_concat(dense, embeddings)
  x = x0
  for i in range(num_cross):
    x = np_cross(x0, x, p[f"cross_{i}"])
  if structure == "stacked":
    return np_logit(np_mlp(x, p["deep_mlp"], 1), p)
  return np_logit(np.concatenate([x, np_mlp(x0, p["deep_mlp"], 1)], axis=1), p)


def np_fm_pairwise(fields):
  """sum_{i<j} <v_i, v_j> by the O(F^2) definition; fields [B, F, d]."""
  total = np.zeros(fields.shape[0])
  for i, j in itertools.combinations(range(fields.shape[1]), 2):
    total += np.sum(fields[:, i] * fields[:, j], axis=1)
  return total


def np_deepfm(p, dense, embeddings):
  first_order = np_dense(np_sorted_concat(dense, embeddings), p["first_order"])[:, 0]
  sparse_fields = [embeddings[k] for k in sorted(embeddings)]
  dense_fields = [dense[:, i:i + 1] * p["dense_field_embedding"][i] for i in range(NUM_DENSE)]
  fields = np.stack(sparse_fields + dense_fields, axis=1)
  deep = np_logit(np_mlp(fields.reshape(fields.shape[0], -1), p["deep_mlp"], 1), p)
  return first_order + np_fm_pairwise(fields) + deep


def np_wide_deep(p, dense, embeddings):
  x = np_sorted_concat(dense, embeddings)
  return np_dense(x, p["wide"])[:, 0] + np_logit(np_mlp(x, p["deep_mlp"], 1), p)


def np_logistic(p, dense, embeddings):
  ids_term = sum(embeddings[k].sum(axis=1) for k in sorted(embeddings))
  return ids_term + np_dense(dense, p["dense"])[:, 0]


NUMPY_REFERENCES = {
    "dnn": np_dnn,
    "dlrm": np_dlrm,
    "dcn_v2": np_dcn,
    "deepfm": np_deepfm,
    "wide_deep": np_wide_deep,
    "logistic": np_logistic,
}


@pytest.mark.parametrize("name", models.MODEL_NAMES)
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_output_shape_and_dtype(name, batch):
  model = tiny_model(name)
  dense, embeddings = make_inputs(batch)
  params = init_params(model, dense, embeddings)
  logits = model.apply({"params": params}, dense, embeddings, train=False)
  assert logits.shape == (batch,)
  assert logits.dtype == jnp.float32


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_forward_matches_numpy(name):
  model = tiny_model(name)
  dense, embeddings = make_inputs(5, seed=1)
  params = init_params(model, dense, embeddings)
  logits = model.apply({"params": params}, dense, embeddings)
  expected = NUMPY_REFERENCES[name](
      to_numpy(params), dense.astype(np.float64),
      {k: v.astype(np.float64) for k, v in embeddings.items()})
  np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("structure", ["stacked", "parallel"])
@pytest.mark.parametrize("low_rank", [0, 2])
def test_dcn_variants_match_numpy(structure, low_rank):
  model = tiny_model("dcn_v2", structure=structure, cross_low_rank=low_rank)
  dense, embeddings = make_inputs(4, seed=2)
  params = init_params(model, dense, embeddings)
  logits = model.apply({"params": params}, dense, embeddings)
  expected = np_dcn(to_numpy(params), dense.astype(np.float64),
                    {k: v.astype(np.float64) for k, v in embeddings.items()}, structure)
  np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-5, atol=1e-5)


EXPECTED_SHAPES = {
    # Inputs: 3 features of dim 4 and 3 dense features, so the concatenation is 15 wide.
    "dnn": {
        "mlp/dense_0/kernel": (15, 8), "mlp/dense_0/bias": (8,),
        "mlp/dense_1/kernel": (8, 4), "mlp/dense_1/bias": (4,),
        "logit/dense/kernel": (4, 1), "logit/dense/bias": (1,),
    },
    "dlrm": {
        # Bottom 3 -> 8 -> 4 (the embedding dim); 4 vectors give 6 pairs; top input 4 + 6.
        "bottom_mlp/dense_0/kernel": (3, 8), "bottom_mlp/dense_0/bias": (8,),
        "bottom_mlp/dense_1/kernel": (8, 4), "bottom_mlp/dense_1/bias": (4,),
        "top_mlp/dense_0/kernel": (10, 6), "top_mlp/dense_0/bias": (6,),
        "logit/dense/kernel": (6, 1), "logit/dense/bias": (1,),
    },
    "dcn_v2": {
        "cross_0/dense/kernel": (15, 15), "cross_0/dense/bias": (15,),
        "cross_1/dense/kernel": (15, 15), "cross_1/dense/bias": (15,),
        "deep_mlp/dense_0/kernel": (15, 8), "deep_mlp/dense_0/bias": (8,),
        "logit/dense/kernel": (8, 1), "logit/dense/bias": (1,),
    },
    "deepfm": {
        # 3 sparse + 3 dense fields of dim 4 feed the deep part: 24 wide.
        "first_order/kernel": (15, 1), "first_order/bias": (1,),
        "dense_field_embedding": (3, 4),
        "deep_mlp/dense_0/kernel": (24, 8), "deep_mlp/dense_0/bias": (8,),
        "logit/dense/kernel": (8, 1), "logit/dense/bias": (1,),
    },
    "wide_deep": {
        "wide/kernel": (15, 1), "wide/bias": (1,),
        "deep_mlp/dense_0/kernel": (15, 8), "deep_mlp/dense_0/bias": (8,),
        "logit/dense/kernel": (8, 1), "logit/dense/bias": (1,),
    },
    "logistic": {"dense/kernel": (3, 1), "dense/bias": (1,)},
}


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_param_shapes(name):
  model = tiny_model(name)
  dense, embeddings = make_inputs(2)
  params = model.init(jax.random.key(0), dense, embeddings)["params"]
  assert param_shapes(params) == EXPECTED_SHAPES[name]


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_params_are_float32_under_bfloat16(name):
  model = tiny_model(name, dtype="bfloat16")
  dense, embeddings = make_inputs(2)
  params = model.init(jax.random.key(0), dense, embeddings)["params"]
  dtypes = {leaf.dtype for leaf in jax.tree.leaves(params)}
  assert dtypes == {jnp.dtype(jnp.float32)}


def test_dcn_low_rank_param_shapes():
  model = tiny_model("dcn_v2", cross_low_rank=2, num_cross_layers=1)
  dense, embeddings = make_inputs(2)
  shapes = param_shapes(model.init(jax.random.key(0), dense, embeddings)["params"])
  assert shapes["cross_0/down/kernel"] == (15, 2)
  assert shapes["cross_0/up/kernel"] == (2, 15)
  assert shapes["cross_0/up/bias"] == (15,)
  assert "cross_0/down/bias" not in shapes


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_bfloat16_close_to_float32(name):
  dense, embeddings = make_inputs(16, seed=3)
  model32 = tiny_model(name)
  model16 = tiny_model(name, dtype="bfloat16")
  params = init_params(model32, dense, embeddings)
  logits32 = model32.apply({"params": params}, dense, embeddings)
  logits16 = model16.apply({"params": params}, dense, embeddings)
  assert logits16.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(logits16), np.asarray(logits32), rtol=0.05, atol=0.1)


@pytest.mark.parametrize("name", models.MODEL_NAMES)
@pytest.mark.parametrize("emb_dtype", [jnp.float16, jnp.bfloat16])
def test_low_precision_embeddings_accepted(name, emb_dtype):
  dense, embeddings = make_inputs(4, seed=4)
  model = tiny_model(name)
  params = init_params(model, dense, embeddings)
  wire = {k: jnp.asarray(v, emb_dtype) for k, v in embeddings.items()}
  logits = model.apply({"params": params}, dense, wire)
  expected = model.apply({"params": params}, dense,
                         {k: np.asarray(v, np.float32) for k, v in wire.items()})
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_jit_matches_eager(name):
  model = tiny_model(name)
  dense, embeddings = make_inputs(6, seed=5)
  params = init_params(model, dense, embeddings)
  eager = model.apply({"params": params}, dense, embeddings, train=False)
  jitted = jax.jit(lambda p, d, e: model.apply({"params": p}, d, e, train=True))(
      params, dense, embeddings)
  np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_embedding_gradients_match_inputs(name):
  model = tiny_model(name)
  dense, embeddings = make_inputs(3, seed=6)
  params = init_params(model, dense, embeddings)
  wire = {k: jnp.asarray(v, jnp.bfloat16) for k, v in embeddings.items()}

  def loss_fn(embs):
    logits = model.apply({"params": params}, dense, embs)
    return losses.sigmoid_cross_entropy(logits, jnp.array([0.0, 1.0, 1.0]))

  grads = jax.grad(loss_fn)(wire)
  assert sorted(grads) == sorted(wire)
  for key in wire:
    assert grads[key].shape == wire[key].shape, key
    assert grads[key].dtype == wire[key].dtype, key
    assert bool(jnp.all(jnp.isfinite(grads[key].astype(jnp.float32)))), key


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_feature_order_does_not_matter(name):
  model = tiny_model(name)
  dense, embeddings = make_inputs(4, seed=7)
  params = init_params(model, dense, embeddings)
  reversed_embeddings = dict(reversed(list(embeddings.items())))
  logits = model.apply({"params": params}, dense, embeddings)
  logits_reversed = model.apply({"params": params}, dense, reversed_embeddings)
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(logits_reversed))


@pytest.mark.parametrize("name", ["dnn", "dcn_v2", "wide_deep"])
def test_unequal_dims_supported(name):
  dims = {"x": 2, "y": 5}
  model = tiny_model(name, feature_dims=dims)
  dense, embeddings = make_inputs(3, feature_dims=dims)
  params = init_params(model, dense, embeddings)
  logits = model.apply({"params": params}, dense, embeddings)
  assert logits.shape == (3,)


@pytest.mark.parametrize("name", ["dlrm", "deepfm"])
def test_unequal_dims_rejected(name):
  with pytest.raises(ValueError, match="every embedding dim to be equal"):
    tiny_model(name, feature_dims={"x": 2, "y": 5})


def test_dlrm_without_dense_features():
  config = models.default_model_config("dlrm")
  config.update(TINY_CONFIGS["dlrm"])
  model = models.build_model(config, feature_dims=FEATURE_DIMS, num_dense=0)
  _, embeddings = make_inputs(2)
  dense = np.zeros((2, 0), np.float32)
  params = model.init(jax.random.key(0), dense, embeddings)["params"]
  assert "bottom_mlp" not in params
  # 3 embeddings give 3 pairs, the whole top MLP input.
  assert params["top_mlp"]["dense_0"]["kernel"].shape == (3, 6)


def test_dot_interaction_hand_case():
  vectors = jnp.array([[[1.0, 0.0], [0.0, 2.0], [3.0, 1.0]]])
  # Pairs (0,1), (0,2), (1,2): 1*0+0*2, 1*3+0*1, 0*3+2*1.
  np.testing.assert_allclose(np.asarray(dlrm.dot_interaction(vectors)), [[0.0, 3.0, 2.0]])
  # With the diagonal: (0,0), (0,1), (0,2), (1,1), (1,2), (2,2).
  np.testing.assert_allclose(np.asarray(dlrm.dot_interaction(vectors, itself=True)),
                             [[1.0, 0.0, 3.0, 4.0, 2.0, 10.0]])


def test_dot_interaction_matches_numpy():
  vectors = np.random.default_rng(8).normal(size=(4, 5, 3))
  got = np.asarray(dlrm.dot_interaction(jnp.asarray(vectors, jnp.float32)))
  expected = np.stack([np.sum(vectors[:, i] * vectors[:, j], axis=1)
                       for i, j in itertools.combinations(range(5), 2)], axis=1)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("low_rank", [0, 3])
def test_cross_layer_matches_numpy(low_rank):
  rng = np.random.default_rng(9)
  x0 = rng.normal(size=(4, 6)).astype(np.float32)
  x = rng.normal(size=(4, 6)).astype(np.float32)
  layer = dcn_v2.CrossLayer(low_rank=low_rank)
  params = init_params(layer, x0, x)
  got = layer.apply({"params": params}, x0, x)
  expected = np_cross(x0.astype(np.float64), x.astype(np.float64), to_numpy(params))
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


def test_cross_layer_hand_case():
  # W = I, b = 1: x_{l+1} = x0 * (x + 1) + x.
  layer = dcn_v2.CrossLayer()
  params = {"dense": {"kernel": jnp.eye(2), "bias": jnp.ones(2)}}
  got = layer.apply({"params": params}, jnp.array([[2.0, 3.0]]), jnp.array([[1.0, -1.0]]))
  np.testing.assert_allclose(np.asarray(got), [[2.0 * 2.0 + 1.0, 3.0 * 0.0 - 1.0]])


def test_fm_interaction_matches_pairwise_sum():
  fields = np.random.default_rng(10).normal(size=(5, 7, 4))
  got = np.asarray(deepfm.fm_interaction(jnp.asarray(fields, jnp.float32)))
  np.testing.assert_allclose(got, np_fm_pairwise(fields), rtol=1e-5, atol=1e-4)


def test_fm_interaction_bfloat16_input_returns_float32():
  fields = jnp.asarray(np.random.default_rng(11).normal(size=(2, 3, 4)), jnp.bfloat16)
  assert deepfm.fm_interaction(fields).dtype == jnp.float32


def test_dropout_needs_rng_only_in_training():
  model = tiny_model("dnn", dropout_rate=0.5)
  dense, embeddings = make_inputs(8)
  params = init_params(model, dense, embeddings)
  eval_logits = model.apply({"params": params}, dense, embeddings, train=False)
  train_logits = model.apply({"params": params}, dense, embeddings, train=True,
                             rngs={"dropout": jax.random.key(1)})
  assert eval_logits.shape == train_logits.shape
  assert not np.allclose(np.asarray(eval_logits), np.asarray(train_logits))


def test_output_bias_init_sets_logit_bias():
  model = tiny_model("dnn", output_bias_init=-1.5)
  dense, embeddings = make_inputs(2)
  params = model.init(jax.random.key(0), dense, embeddings)["params"]
  np.testing.assert_allclose(np.asarray(params["logit"]["dense"]["bias"]), [-1.5])


def test_unknown_model_name_rejected():
  with pytest.raises(ValueError, match="Unknown model name 'xgb'"):
    models.build_model({"name": "xgb"}, feature_dims=FEATURE_DIMS, num_dense=1)


def test_unknown_config_field_rejected():
  with pytest.raises(ValueError, match=r"Unknown fields \['hidden'\]"):
    models.build_model({"name": "dnn", "hidden": (4,)}, feature_dims=FEATURE_DIMS,
                       num_dense=1)


def test_invalid_dtype_rejected():
  with pytest.raises(ValueError, match="Invalid model dtype 'float16'"):
    models.build_model({"name": "dnn", "dtype": "float16"}, feature_dims=FEATURE_DIMS,
                       num_dense=1)


def test_missing_embedding_rejected():
  model = tiny_model("dnn")
  dense, embeddings = make_inputs(2)
  del embeddings["b"]
  with pytest.raises(ValueError, match=r"missing \['b'\]"):
    model.init(jax.random.key(0), dense, embeddings)


def test_wrong_dense_width_rejected():
  model = tiny_model("dnn")
  _, embeddings = make_inputs(2)
  with pytest.raises(ValueError, match=r"\[batch, 3\]"):
    model.init(jax.random.key(0), np.zeros((2, 5), np.float32), embeddings)


def test_default_configs_build():
  for name in models.MODEL_NAMES:
    config = models.default_model_config(name)
    assert config.name == name
    models.build_model(config, feature_dims=FEATURE_DIMS, num_dense=NUM_DENSE)


def np_sigmoid_cross_entropy(logits, labels):
  probs = 1.0 / (1.0 + np.exp(-logits))
  return -(labels * np.log(probs) + (1.0 - labels) * np.log(1.0 - probs))


def test_loss_unweighted_matches_numpy():
  logits = np.array([0.5, -1.0, 2.0, 0.0])
  labels = np.array([1.0, 0.0, 0.0, 1.0])
  got = float(losses.sigmoid_cross_entropy(logits, labels))
  np.testing.assert_allclose(got, np.mean(np_sigmoid_cross_entropy(logits, labels)), rtol=1e-6)


def test_loss_weighted_matches_numpy():
  logits = np.array([0.5, -1.0, 2.0, 0.0, 7.0])
  labels = np.array([1.0, 0.0, 0.0, 1.0, 0.0])
  weights = np.array([1.0, 2.0, 0.5, 1.0, 0.0])
  per_sample = np_sigmoid_cross_entropy(logits, labels)
  expected = np.sum(weights * per_sample) / np.sum(weights)
  got = float(losses.sigmoid_cross_entropy(logits, labels, weights))
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_loss_ignores_padding():
  logits = jnp.array([0.3, -0.2, 100.0])
  labels = jnp.array([1.0, 0.0, 0.0])
  padded = losses.sigmoid_cross_entropy(logits, labels, jnp.array([1.0, 1.0, 0.0]))
  unpadded = losses.sigmoid_cross_entropy(logits[:2], labels[:2])
  np.testing.assert_allclose(float(padded), float(unpadded), rtol=1e-6)


def test_loss_zero_weights_returns_zero():
  logits = jnp.array([0.3, -0.2])
  labels = jnp.array([1.0, 0.0])
  weights = jnp.zeros(2)
  assert float(losses.sigmoid_cross_entropy(logits, labels, weights)) == 0.0
  grad = jax.grad(losses.sigmoid_cross_entropy)(logits, labels, weights)
  np.testing.assert_array_equal(np.asarray(grad), [0.0, 0.0])


def test_loss_stable_for_large_logits():
  got = float(losses.sigmoid_cross_entropy(jnp.array([-200.0]), jnp.array([1.0])))
  np.testing.assert_allclose(got, 200.0, rtol=1e-6)
