"""The dense side: a data-parallel `jax.jit` step over a device mesh.

The dense towers train synchronously. Every array of a batch (dense features,
pooled embeddings, labels, weights) is sharded along its first axis over the
mesh axis `data`; parameters and optimizer state are replicated. The loss is
the weighted mean over the global batch, so XLA's SPMD partitioner averages
gradients across devices (the all-reduce of PERSIA's NN workers) inside the
compiled step.

The step also returns the gradient of the loss with respect to each pooled
embedding, cast to the wire dtype, which the embedding worker turns into
per-ID gradients for the parameter server.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from persia_jax.models import losses

DATA_AXIS = "data"

Array = jax.Array
PyTree = Any


class TrainState(train_state.TrainState):
  """Dense parameters, their optax state and the step count."""


@dataclasses.dataclass
class DenseBatch:
  """The device-side inputs of one dense step, all sharded along the batch axis.

  Attributes:
    dense: float32 [B, num_dense].
    embeddings: feature name to [B, dim] (or [B, max_len, dim]) in the wire dtype.
    masks: feature name to float32 [B, max_len], for raw (sequence) features only.
    labels: float32 [B].
    weights: float32 [B], 0 for padding.
  """

  dense: Array
  embeddings: dict[str, Array]
  masks: dict[str, Array]
  labels: Array
  weights: Array


jax.tree_util.register_dataclass(
    DenseBatch,
    data_fields=["dense", "embeddings", "masks", "labels", "weights"],
    meta_fields=[])


def create_mesh(num_devices: int = 0) -> Mesh:
  """Returns a 1-D data-parallel mesh over the first `num_devices` devices (0 = all)."""
  devices = jax.devices()
  if num_devices:
    if num_devices > len(devices):
      raise ValueError(
          f"config.num_devices={num_devices} but only {len(devices)} devices are"
          " visible; lower it or set it to 0 to use all devices.")
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def check_batch_size(batch_size: int, mesh: Mesh, name: str = "batch_size") -> None:
  """Raises if the global batch does not split evenly over the mesh."""
  num_devices = mesh.devices.size
  if batch_size % num_devices:
    raise ValueError(
        f"config.{name}={batch_size} is not divisible by the {num_devices} devices"
        f" of the mesh; choose a multiple of {num_devices} (for example"
        f" {max(num_devices, batch_size // num_devices * num_devices)}) or set"
        " config.num_devices.")


def build_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Builds the dense optax optimizer from `config.optimizer`.

  Fields: name ("adam", "adamw", "adagrad", "sgd"), learning_rate, optional
  warmup_steps (linear warmup), weight_decay (adamw), momentum (sgd) and
  grad_clip_norm (0 disables clipping).
  """
  name = config.name
  learning_rate = config.learning_rate
  warmup_steps = config.get("warmup_steps", 0)
  if warmup_steps:
    learning_rate = optax.linear_schedule(0.0, config.learning_rate, warmup_steps)
  if name == "adam":
    tx = optax.adam(learning_rate)
  elif name == "adamw":
    tx = optax.adamw(learning_rate, weight_decay=config.get("weight_decay", 1e-4))
  elif name == "adagrad":
    tx = optax.adagrad(learning_rate)
  elif name == "sgd":
    tx = optax.sgd(learning_rate, momentum=config.get("momentum", None) or None)
  else:
    raise ValueError(
        f"Unknown config.optimizer.name={name!r}; expected one of adam, adamw,"
        " adagrad, sgd.")
  clip = config.get("grad_clip_norm", 0.0)
  if clip:
    tx = optax.chain(optax.clip_by_global_norm(clip), tx)
  return tx


def to_host(array: Array) -> np.ndarray:
  """Copies this process's rows of a batch-sharded array to a numpy array.

  Uses only addressable shards, so it also works when other processes hold
  the rest of the global batch.
  """
  if array.is_fully_addressable:
    return np.asarray(array)
  shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)
  return np.concatenate([np.asarray(s.data) for s in shards])


class DenseTrainer:
  """Builds and runs the jitted dense train and eval steps on a mesh.

  Attributes:
    model: the Flax module; `model.apply({"params": p}, dense, embeddings,
      masks=..., train=...)` returns float32 logits [B].
    mesh: the 1-D data-parallel mesh.
  """

  def __init__(self, model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh,
               *, wire_dtype: str = "float32", uses_masks: bool = False,
               donate: bool = True, dropout_seed: int = 0):
    self.model = model
    self.tx = tx
    self.mesh = mesh
    self.wire_dtype = jnp.dtype(wire_dtype)
    self.uses_masks = uses_masks
    self.dropout_seed = dropout_seed
    self.replicated = NamedSharding(mesh, PartitionSpec())
    self.batch_sharding = NamedSharding(mesh, PartitionSpec(DATA_AXIS))
    # The old state is dead after a step, so XLA may reuse its buffers.
    self._train_step = jax.jit(
        lambda state, batch: self._train_step_impl(state, state.params, batch),
        in_shardings=(self.replicated, self.batch_sharding),
        out_shardings=(self.replicated, self.batch_sharding, self.replicated),
        donate_argnums=(0,) if donate else ())
    # The fully asynchronous mode takes the gradient at older parameters, which
    # the caller keeps alive, so nothing is donated.
    self._delayed_train_step = jax.jit(
        self._train_step_impl,
        in_shardings=(self.replicated, self.replicated, self.batch_sharding),
        out_shardings=(self.replicated, self.batch_sharding, self.replicated))
    self._eval_step = jax.jit(
        self._eval_step_impl,
        in_shardings=(self.replicated, self.batch_sharding),
        out_shardings=self.batch_sharding)

  def _apply(self, params, batch: DenseBatch, embeddings, train: bool, step=None):
    kwargs = {"masks": batch.masks} if self.uses_masks else {}
    if train:
      # Dropout keys come from the step count, so a resumed run draws the same
      # masks as an uninterrupted one.
      kwargs["rngs"] = {"dropout": jax.random.fold_in(
          jax.random.PRNGKey(self.dropout_seed), step)}
    return self.model.apply({"params": params}, batch.dense, embeddings, train=train,
                            **kwargs)

  def init(self, rng: Array, batch: DenseBatch) -> TrainState:
    """Initialises replicated parameters and optimizer state from a sample batch."""

    def init_fn(rng, batch):
      kwargs = {"masks": batch.masks} if self.uses_masks else {}
      variables = self.model.init(rng, batch.dense, batch.embeddings, train=False, **kwargs)
      return TrainState.create(apply_fn=self.model.apply, params=variables["params"],
                               tx=self.tx)

    with jax.set_mesh(self.mesh):
      return jax.jit(init_fn, in_shardings=(self.replicated, self.batch_sharding),
                     out_shardings=self.replicated)(rng, batch)

  def _train_step_impl(self, state: TrainState, grad_params: PyTree, batch: DenseBatch):
    # `grad_params` are the parameters the gradient is taken at: the current
    # ones for synchronous dense training, older ones for the fully
    # asynchronous baseline.
    def loss_fn(params, embeddings):
      logits = self._apply(params, batch, embeddings, train=True, step=state.step)
      return losses.sigmoid_cross_entropy(logits, batch.labels, batch.weights)

    embeddings = jax.tree.map(lambda x: x.astype(jnp.float32), batch.embeddings)
    loss, (param_grads, embedding_grads) = jax.value_and_grad(loss_fn, argnums=(0, 1))(
        grad_params, embeddings)
    new_state = state.apply_gradients(grads=param_grads)
    embedding_grads = jax.tree.map(lambda g: g.astype(self.wire_dtype), embedding_grads)
    grad_norm = optax.tree.norm(param_grads)
    return new_state, embedding_grads, {"loss": loss, "dense_grad_norm": grad_norm}

  def train_step(self, state: TrainState, batch: DenseBatch,
                 grad_params: PyTree | None = None):
    """Runs one synchronous dense step.

    Args:
      state: replicated train state. Unless `grad_params` is given, it is
        donated: do not use it afterwards.
      batch: the sharded batch.
      grad_params: parameters to take the gradient at; None means `state.params`.

    Returns:
      (new_state, embedding_grads, metrics). embedding_grads maps each feature to
      d(loss)/d(embedding) in the wire dtype, sharded like the batch. metrics
      contains the scalars `loss` and `dense_grad_norm`.
    """
    with jax.set_mesh(self.mesh):
      if grad_params is None:
        return self._train_step(state, batch)
      return self._delayed_train_step(state, grad_params, batch)

  def _eval_step_impl(self, params, batch: DenseBatch):
    embeddings = jax.tree.map(lambda x: x.astype(jnp.float32), batch.embeddings)
    return self._apply(params, batch, embeddings, train=False)

  def eval_step(self, params: PyTree, batch: DenseBatch) -> Array:
    """Returns float32 [B] logits, sharded like the batch."""
    with jax.set_mesh(self.mesh):
      return self._eval_step(params, batch)

  def put_batch(self, dense: np.ndarray, embeddings: Mapping[str, np.ndarray],
                masks: Mapping[str, np.ndarray], labels: np.ndarray,
                weights: np.ndarray) -> DenseBatch:
    """Moves host arrays of this process's part of the batch onto the mesh."""
    batch = DenseBatch(dense=dense, embeddings=dict(embeddings), masks=dict(masks),
                       labels=labels, weights=weights)
    if jax.process_count() == 1:
      # One call for all leaves: per-array transfers cost more than the lookup
      # of a small batch.
      return jax.device_put(batch, self.batch_sharding)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self.batch_sharding, x), batch)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def param_count(params: PyTree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))

