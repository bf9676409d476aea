"""The training loop shared by the sync, hybrid and async modes.

`Trainer` wires the parts together and `train_and_evaluate` runs a whole
experiment. The loop reads as labelled stages:

  1. workdir, config and logging
  2. mesh
  3. input pipelines
  4. embedding stores and worker (the parameter server side)
  5. dense model, optimizer and initial state (the NN worker side)
  6. resume: the workdir's latest checkpoint, else config.restore_from, else scratch
  7. train loop: per batch, lookup -> dense step -> push, ordered by the mode's
     embedding schedule (see `schedule.py`), with periodic log, eval and checkpoint
  8. final flush, eval, summary and plot

Modes:
  sync    push(t) finishes before lookup(t + 1).
  hybrid  pushes run in the background; a lookup may miss the gradients of at
          most `embedding_staleness` earlier batches. Dense training stays
          synchronous.
  async   as hybrid, and the dense gradient of step t is taken at the dense
          parameters of step t - dense_staleness: the fully asynchronous
          baseline of the PERSIA paper (Lian et al., KDD 2022), with a fixed
          delay.
With `deterministic_replay=True`, hybrid and async apply the gradients of batch
t exactly before lookup(t + tau + 1), so runs are bit-reproducible.
"""

from __future__ import annotations

import collections
import fcntl
import json
import logging as pylogging
import math
import os
import pathlib
import socket
import time
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
from absl import logging

from persia_jax import data as data_lib
from persia_jax import models as models_lib
from persia_jax.data.batch import Batch, SparseInput
from persia_jax.embedding import features as features_lib
from persia_jax.embedding import worker as worker_lib
from persia_jax.evaluation import metrics as metrics_lib
from persia_jax.evaluation import plots as plots_lib
from persia_jax.evaluation import progress as progress_lib
from persia_jax.evaluation import writers as writers_lib
from persia_jax.training import checkpoint as checkpoint_lib
from persia_jax.training import dense as dense_lib
from persia_jax.training import schedule as schedule_lib

MODES = ("sync", "hybrid", "async")


class _DropLibraryInfo(pylogging.Filter):
  """Drops INFO records logged from inside orbax, which logs every file it writes."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


def quiet_library_logs() -> None:
  """Keeps training logs readable: orbax's per-file INFO lines are dropped."""
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _DropLibraryInfo) for f in handler.filters):
    handler.addFilter(_DropLibraryInfo())


class WorkdirInUseError(RuntimeError):
  """Another process is training in the same workdir."""


def lock_workdir(workdir: pathlib.Path):
  """Takes an exclusive lock on `workdir/.lock`; returns the open file that holds it.

  The lock is released when the file is closed or the process ends, so a
  killed run never leaves a stale lock behind.
  """
  if workdir.exists() and not workdir.is_dir():
    raise NotADirectoryError(f"The workdir {workdir} exists and is a file; choose a directory.")
  workdir.mkdir(parents=True, exist_ok=True)
  lock_file = open(workdir / ".lock", "a+")  # pylint: disable=consider-using-with
  try:
    fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    lock_file.seek(0)
    owner = lock_file.read().strip() or "another process"
    lock_file.close()
    raise WorkdirInUseError(
        f"The workdir {workdir} is in use by {owner}. Wait for that run to finish, or"
        " choose another --workdir.") from None
  lock_file.seek(0)
  lock_file.truncate()
  lock_file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
  lock_file.flush()
  return lock_file


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises a ValueError naming the field for an inconsistent training config."""
  if config.mode not in MODES:
    raise ValueError(f"config.mode={config.mode!r} is not one of {MODES}.")
  if config.embedding_staleness < 0:
    raise ValueError(
        f"config.embedding_staleness={config.embedding_staleness} must be >= 0.")
  if config.dense_staleness < 0:
    raise ValueError(f"config.dense_staleness={config.dense_staleness} must be >= 0.")
  if config.dense_staleness and config.mode != "async":
    raise ValueError(
        f"config.dense_staleness={config.dense_staleness} only applies to"
        f" config.mode='async', but the mode is {config.mode!r}; set it to 0.")
  for name in ("batch_size", "eval_batch_size", "num_train_steps", "log_every_steps",
               "num_update_threads"):
    if config[name] <= 0:
      raise ValueError(f"config.{name}={config[name]} must be positive.")
  for name in ("eval_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
    if config[name] < 0:
      raise ValueError(f"config.{name}={config[name]} must be >= 0 (0 turns it off).")


def resolve_features(config: ml_collections.ConfigDict, schema) -> None:
  """Fills `config.embedding.features` (and missing tables) from the data schema.

  Used when the config lists no features. Each sparse column becomes a
  feature with the column's pooling that reads `config.embedding.default_table`
  if set, else the column's own table. A table the config does not define is
  created from `config.embedding.table_defaults`. Writing the result into the
  config makes the saved config.json self-contained for the exported model.
  """
  embedding = config.embedding
  if embedding.get("features"):
    return
  default_table = embedding.get("default_table") or None
  features = {}
  for column in schema.sparse:
    features[column.name] = {"table": default_table or column.table or column.name,
                             "pooling": column.pooling}
  tables = embedding.tables.to_dict() if embedding.get("tables") else {}
  missing = sorted({f["table"] for f in features.values()} - set(tables))
  if missing and not embedding.get("table_defaults"):
    raise ValueError(
        f"The data schema reads embedding tables {missing} that config.embedding.tables"
        " does not define; define them, set config.embedding.default_table to one"
        " shared table, or set config.embedding.table_defaults.")
  with config.unlocked():
    for name in missing:
      tables[name] = {}
    embedding.tables = tables
    embedding.features = features


def pad_rows(x: np.ndarray, size: int) -> np.ndarray:
  """Pads the first axis of `x` with zeros up to `size` rows."""
  if x.shape[0] == size:
    return x
  out = np.zeros((size,) + x.shape[1:], x.dtype)
  out[:x.shape[0]] = x
  return out


def prepare_batch(worker, dense: dense_lib.DenseTrainer, batch: Batch, *, train: bool,
                  pad_to: int):
  """lookup: gathers and pools embeddings, pads to `pad_to` rows, moves to the mesh.

  Padded rows get weight 0, so they change neither the loss nor the metrics.

  Returns:
    (dense_batch, lookup_context, num_real_rows).
  """
  activations, context = worker.lookup(batch.sparse, train=train)
  embeddings = {k: pad_rows(v, pad_to) for k, v in activations.values.items()}
  masks = {k: pad_rows(v, pad_to) for k, v in activations.masks.items()}
  dense_batch = dense.put_batch(
      pad_rows(batch.dense, pad_to), embeddings, masks, pad_rows(batch.labels, pad_to),
      pad_rows(batch.weights.astype(np.float32), pad_to))
  return dense_batch, context, batch.size


class StageTimer:
  """Accumulates wall time per named stage between log intervals."""

  def __init__(self):
    self.seconds = collections.defaultdict(float)

  def add(self, stage: str, seconds: float) -> None:
    self.seconds[stage] += seconds

  def pop(self) -> dict[str, float]:
    out, self.seconds = dict(self.seconds), collections.defaultdict(float)
    return out


class Trainer:
  """Holds the stores, worker, dense state and schedule of one training run.

  Notebooks can build a `Trainer`, call `train(num_steps)` and `evaluate()`,
  and read `state`, `stores` and the workdir files.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str | os.PathLike | None):
    validate_config(config)
    self.config = config
    self.workdir = pathlib.Path(workdir) if workdir else None

    # Stage 1: workdir. config.json is written in stage 4, once the feature
    # list from the data schema is filled in.
    self._lock = lock_workdir(self.workdir) if self.workdir else None
    try:
      self._setup(config)
    except BaseException:
      if hasattr(self, "train_iter"):
        self.train_iter.close()
      self._release_lock()
      raise

  def _release_lock(self) -> None:
    if self._lock is not None:
      self._lock.close()
      self._lock = None

  def _setup(self, config: ml_collections.ConfigDict) -> None:
    """Runs stages 2 to 6; see the module docstring."""
    # Stage 2: mesh.
    self.mesh = dense_lib.create_mesh(config.num_devices)
    dense_lib.check_batch_size(config.batch_size, self.mesh, "batch_size")
    dense_lib.check_batch_size(config.eval_batch_size, self.mesh, "eval_batch_size")
    self.process_count = jax.process_count()
    self.local_batch_size = config.batch_size // self.process_count
    self.local_eval_batch_size = config.eval_batch_size // self.process_count
    logging.info("Mesh: %d devices %s", self.mesh.devices.size,
                 [d.platform for d in self.mesh.devices.flat][:1])

    # Stage 3: input pipelines.
    self.train_iter = data_lib.build_input(
        config.data, split="train", batch_size=self.local_batch_size, seed=config.seed,
        process_index=jax.process_index(), process_count=self.process_count)
    self.schema = self.train_iter.schema

    # Stage 4: embedding stores and worker.
    resolve_features(config, self.schema)
    tables, feature_specs = features_lib.specs_from_config(config.embedding)
    self.tables = {t.name: t for t in tables}
    self.stores = features_lib.build_stores(tables, seed=config.seed)
    self.worker = worker_lib.EmbeddingWorker(
        feature_specs, self.stores, wire_dtype=config.embedding.wire_dtype)
    self.feature_dims = self.worker.output_dims()
    self.uses_masks = any(f.pooling == "raw" for f in feature_specs)
    logging.info("Resolved config:\n%s", config)
    if self.workdir:
      with open(self.workdir / "config.json", "w") as f:
        f.write(config.to_json_best_effort(indent=2))

    # Stage 5: dense model, optimizer and initial state.
    self.model = models_lib.build_model(
        config.model, feature_dims=self.feature_dims, num_dense=self.schema.num_dense)
    self.dense = dense_lib.DenseTrainer(
        self.model, dense_lib.build_optimizer(config.optimizer), self.mesh,
        wire_dtype=config.embedding.wire_dtype, uses_masks=self.uses_masks,
        donate=config.dense_staleness == 0, dropout_seed=config.seed)
    self.rng = jax.random.PRNGKey(config.seed)
    init_rng, self.rng = jax.random.split(self.rng)
    sample = self._prepare(self._zero_batch(), train=False, pad_to=self.local_batch_size)[0]
    self.state = self.dense.init(init_rng, sample)
    self.param_history = collections.deque(
        [self.state.params] * (config.dense_staleness + 1),
        maxlen=config.dense_staleness + 1)
    logging.info("Dense parameters: %d; embedding tables: %s", dense_lib.param_count(
        self.state.params), {t.name: t.dim for t in tables})

    # Stage 6: resume, in this order: the workdir's latest checkpoint (an
    # interrupted run continues), then config.restore_from (start from another
    # run's weights), then scratch.
    self.step = 0
    pending = []
    latest = checkpoint_lib.latest_checkpoint(self.workdir) if self.workdir else None
    if latest:
      pending = self._restore(latest, resume_input=True)
      if self.step >= config.num_train_steps:
        logging.warning(
            "The workdir's latest checkpoint is at step %d, at or past"
            " config.num_train_steps=%d, so there is nothing left to train. Use a new"
            " workdir to train from scratch.", self.step, config.num_train_steps)
    elif config.get("restore_from"):
      self._restore(checkpoint_lib.resolve_checkpoint(config.restore_from),
                    resume_input=False)
    self.schedule = schedule_lib.make_schedule(
        config.mode, self.worker.apply, staleness=config.embedding_staleness,
        num_threads=config.num_update_threads,
        deterministic=config.deterministic_replay, start_step=self.step)
    self.schedule.restore_pending(pending)
    self.staleness_log: list[int] = []
    self.train_seconds = 0.0
    # Steps and seconds after the first log interval, which includes compilation.
    self.steady_steps = 0
    self.steady_seconds = 0.0
    self.timer = StageTimer()
    self.writer = None
    if self.workdir:
      # Rows after the resumed step describe work that is about to be redone,
      # so the writer drops them.
      self.writer = writers_lib.create_default_writer(self.workdir, log=False,
                                                      resume_step=self.step)

  # --- the three named steps -------------------------------------------------

  def _zero_batch(self) -> Batch:
    size = self.local_batch_size
    sparse = {}
    for column in self.schema.sparse:
      sparse[column.name] = SparseInput(ids=np.zeros(size, np.uint64),
                                        lengths=np.ones(size, np.int32))
    return Batch(labels=np.zeros(size, np.float32),
                 dense=np.zeros((size, self.schema.num_dense), np.float32), sparse=sparse)

  def _prepare(self, batch: Batch, *, train: bool, pad_to: int):
    return prepare_batch(self.worker, self.dense, batch, train=train, pad_to=pad_to)

  def _push_fn(self, context, embedding_grads, num_rows: int):
    """push: returns a thunk that fetches d(loss)/d(embedding) and makes per-ID gradients."""

    def grads_fn():
      host_grads = {k: dense_lib.to_host(v)[:num_rows] for k, v in embedding_grads.items()}
      return self.worker.backward(context, host_grads)

    return grads_fn

  def train_step(self, batch: Batch):
    """Runs lookup, dense step and push for one batch; returns the device loss."""
    timer = self.timer

    start = time.perf_counter()
    self.staleness_log.append(self.schedule.before_lookup(self.step))
    timer.add("bound_wait", time.perf_counter() - start)

    start = time.perf_counter()
    dense_batch, context, num_rows = self._prepare(batch, train=True,
                                                   pad_to=self.local_batch_size)
    timer.add("lookup", time.perf_counter() - start)

    start = time.perf_counter()
    grad_params = self.param_history[0] if self.config.dense_staleness else None
    self.state, embedding_grads, metrics = self.dense.train_step(
        self.state, dense_batch, grad_params)
    if self.config.dense_staleness:
      self.param_history.append(self.state.params)
    timer.add("dense_dispatch", time.perf_counter() - start)

    start = time.perf_counter()
    self.schedule.submit(self.step, self._push_fn(context, embedding_grads, num_rows))
    timer.add("push_submit", time.perf_counter() - start)
    self.step += 1
    return metrics

  # --- evaluation --------------------------------------------------------------

  def evaluate(self, split: str = "test") -> dict[str, float]:
    """Scores a whole split with read-only lookups; returns AUC, logloss and more.

    The store is read as it is: in the hybrid and async modes up to tau
    batches' gradients may still be pending (the final eval flushes first).
    """
    accumulator = metrics_lib.EvalAccumulator()
    with data_lib.build_input(self.config.data, split=split,
                              batch_size=self.local_eval_batch_size, seed=self.config.seed,
                              process_index=jax.process_index(),
                              process_count=self.process_count) as batches:
      for batch in batches:
        dense_batch, _, num_rows = self._prepare(batch, train=False,
                                                 pad_to=self.local_eval_batch_size)
        logits = dense_lib.to_host(self.dense.eval_step(self.state.params, dense_batch))
        accumulator.add(batch.labels, logits[:num_rows], batch.weights)
    return accumulator.compute()

  # --- checkpoints -------------------------------------------------------------

  def _dense_tree(self):
    tree = {"params": self.state.params, "opt_state": self.state.opt_state,
            "step": self.state.step}
    if self.config.dense_staleness:
      tree["param_history"] = list(self.param_history)
    return tree

  def save_checkpoint(self) -> pathlib.Path:
    """Saves dense state, stores, input position and pending pushes atomically."""
    if self.schedule.name == "threaded":
      # Threaded pushes are in flight with no fixed order; apply them so the
      # saved store is consistent. Replay keeps its queue and saves it instead.
      self.schedule.flush()
    pending = self.schedule.pending()
    meta = {
        "input": self.train_iter.state_dict(),
        "rng": np.asarray(self.rng).tolist(),
        "mode": self.config.mode,
        "embedding_staleness": self.config.embedding_staleness,
        "deterministic_replay": self.config.deterministic_replay,
    }
    return checkpoint_lib.save_checkpoint(
        self.workdir, self.step, dense=self._dense_tree(), stores=self.stores, meta=meta,
        pending=pending, keep=self.config.keep_checkpoints)

  def _restore(self, path, *, resume_input: bool):
    dense, meta, pending = checkpoint_lib.restore_checkpoint(
        path, dense_target=self._dense_tree(), stores=self.stores)
    self.state = self.state.replace(params=dense["params"], opt_state=dense["opt_state"],
                                    step=dense["step"])
    if "param_history" in dense:
      self.param_history = collections.deque(dense["param_history"],
                                             maxlen=self.config.dense_staleness + 1)
    if resume_input:
      self.step = int(meta["step"])
      self.train_iter.load_state_dict(meta["input"])
      self.rng = jax.numpy.asarray(meta["rng"], jax.numpy.uint32)
      logging.info("Resumed from %s at step %d.", path, self.step)
      return pending
    logging.info("Initialised from %s (step counter and input start from 0).", path)
    return []

  # --- the loop ----------------------------------------------------------------

  def train(self, num_steps: int | None = None) -> dict[str, Any]:
    """Trains until `config.num_train_steps` (or `num_steps` more steps)."""
    config = self.config
    end_step = config.num_train_steps if num_steps is None else self.step + num_steps
    progress = progress_lib.ProgressLogger(
        total_steps=end_step, batch_size=config.batch_size,
        every_steps=config.log_every_steps, start_step=self.step)
    losses = []
    last_eval: dict[str, float] = {}
    loop_start = time.perf_counter()
    excluded = 0.0  # eval and checkpoint time, left out of train_seconds
    steady_start = None  # (time, excluded, step) at the end of the first log interval
    iterator: Iterator[Batch] = iter(self.train_iter)
    exhausted = False
    while self.step < end_step:
      start = time.perf_counter()
      try:
        batch = next(iterator)
      except StopIteration:
        logging.info("Input exhausted at step %d (config.data.num_epochs).", self.step)
        exhausted = True
        break
      self.timer.add("input_wait", time.perf_counter() - start)

      losses.append(self.train_step(batch)["loss"])
      step = self.step

      if step % config.log_every_steps == 0 or step == end_step:
        self._log_train(step, losses, progress)
        losses = []
        if steady_start is None:
          jax.block_until_ready(self.state)
          steady_start = (time.perf_counter(), excluded, step)
      periodic_start = time.perf_counter()
      if config.eval_every_steps and step % config.eval_every_steps == 0 and step < end_step:
        last_eval = self._log_eval(step)
      if (self.workdir and config.checkpoint_every_steps
          and step % config.checkpoint_every_steps == 0):
        self._check_finite(step, losses)
        self.save_checkpoint()
      excluded += time.perf_counter() - periodic_start

    finished = self.step >= config.num_train_steps or exhausted
    if finished:
      # The run is over: apply every pending push before the final eval. A
      # partial call (num_steps) leaves them pending, so calling train()
      # repeatedly gives the same result as one uninterrupted call.
      self.schedule.flush()
    jax.block_until_ready(self.state)
    now = time.perf_counter()
    self.train_seconds += now - loop_start - excluded
    if steady_start is not None and self.step > steady_start[2]:
      self.steady_seconds += now - steady_start[0] - (excluded - steady_start[1])
      self.steady_steps += self.step - steady_start[2]
    if losses:
      self._log_train(self.step, losses, progress)
    if not finished:
      return last_eval
    last_eval = self._log_eval(self.step)
    if self.workdir and config.checkpoint_every_steps:
      self.save_checkpoint()
    return last_eval

  def _check_finite(self, step: int, losses) -> np.ndarray:
    """Raises FloatingPointError if a loss or a dense parameter is NaN or infinite."""
    loss_values = np.asarray(jax.device_get(losses), np.float64)
    bad_params = [jax.tree_util.keystr(path) for path, x in
                  jax.tree_util.tree_leaves_with_path(self.state.params)
                  if not bool(jax.numpy.isfinite(x).all())]
    if not np.all(np.isfinite(loss_values)) or bad_params:
      detail = (f"loss {loss_values[~np.isfinite(loss_values)][0]}"
                if not np.all(np.isfinite(loss_values)) else f"parameters {bad_params[:3]}")
      raise FloatingPointError(
          f"Non-finite training {detail} within the {len(loss_values)} steps before"
          f" step {step}. The run stops here; the last good checkpoint (if any) is"
          " kept. Lower the learning rates or set config.optimizer.grad_clip_norm.")
    return loss_values

  def _log_train(self, step: int, losses, progress) -> None:
    loss_values = self._check_finite(step, losses)
    staleness = self.staleness_log
    self.staleness_log = []
    scalars = {"train_loss": float(loss_values.mean())}
    scalars.update(progress.update(step, loss=scalars["train_loss"]) or {})
    stages = self.timer.pop()
    stages["push_background"] = self.schedule.push_seconds
    self.schedule.push_seconds = 0.0
    scalars.update({f"time/{k}": v for k, v in stages.items()})
    logging.info("Stage seconds over the last %d steps: %s", len(loss_values),
                 ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
    if staleness:
      summary = metrics_lib.staleness_summary(staleness)
      scalars.update({f"staleness/{k}": v for k, v in summary.items() if k != "histogram"})
      scalars.update({f"staleness/count_{k}": v for k, v in summary["histogram"].items()})
    if self.writer:
      self.writer.write_scalars(step, scalars)

  def _log_eval(self, step: int) -> dict[str, float]:
    start = time.perf_counter()
    results = self.evaluate()
    results = {f"eval_{k}": v for k, v in results.items()}
    results["eval_seconds"] = time.perf_counter() - start
    logging.info("Eval at step %d: AUC %.4f, logloss %.4f", step, results["eval_auc"],
                 results["eval_logloss"])
    if self.writer:
      self.writer.write_scalars(step, results)
    return results

  def close(self) -> None:
    """Flushes pending pushes, stops background threads and releases the workdir."""
    try:
      self.schedule.close()
    finally:
      self.train_iter.close()
      if self.writer:
        self.writer.close()
      self._release_lock()


def _write_json(path: pathlib.Path, value: dict[str, Any]) -> None:
  tmp = path.with_suffix(path.suffix + ".tmp")
  with open(tmp, "w") as f:
    json.dump(value, f, indent=2, default=float)
  os.replace(tmp, path)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs a whole experiment in `workdir` and returns its summary.

  Writes `config.json`, `metrics.jsonl`, `status.json` (running, done,
  diverged, interrupted or failed), `summary.json` and `eval_auc.png` into the
  workdir.
  """
  workdir_path = pathlib.Path(workdir)
  status_path = workdir_path / "status.json"
  start = time.time()
  # An invalid config starts no run, so it leaves the workdir's status alone.
  validate_config(config)
  try:
    trainer = Trainer(config, workdir)
  except WorkdirInUseError:
    raise  # The status file belongs to the run that has the workdir locked.
  except BaseException as error:
    if workdir_path.is_dir():
      _write_json(status_path, {"status": "failed", "message": f"{type(error).__name__}: {error}"})
    raise
  _write_json(status_path, {"status": "running", "pid": os.getpid()})
  try:
    final = trainer.train()
    if config.export:
      # Imported here because inference builds on this module.
      from persia_jax.training import inference  # pylint: disable=g-import-not-at-top
      inference.export_model(trainer, workdir_path / "export")
  except FloatingPointError as error:
    _write_json(status_path, {"status": "diverged", "message": str(error)})
    raise
  except KeyboardInterrupt:
    _write_json(status_path, {"status": "interrupted", "step": trainer.step})
    raise
  except BaseException as error:
    _write_json(status_path, {"status": "failed", "step": trainer.step,
                              "message": f"{type(error).__name__}: {error}"})
    raise
  finally:
    trainer.close()
  summary = {
      "mode": config.mode,
      "embedding_staleness": config.embedding_staleness,
      "dense_staleness": config.dense_staleness,
      "deterministic_replay": config.deterministic_replay,
      "steps": trainer.step,
      "wall_seconds": time.time() - start,
      "train_seconds": trainer.train_seconds,
      # Throughput after the first log interval, which includes compilation.
      "samples_per_second": (trainer.steady_steps * config.batch_size / trainer.steady_seconds
                             if trainer.steady_seconds else float("nan")),
      **final,
      "embedding": {name: store.stats() for name, store in trainer.stores.items()},
      "workdir": str(workdir_path.resolve()),
  }
  _write_json(workdir_path / "summary.json", summary)
  plots_lib.plot_metric({config.mode: workdir_path / "metrics.jsonl"}, key="eval_auc",
                        out_png=workdir_path / "eval_auc.png")
  _write_json(status_path, {"status": "done"})
  if not math.isnan(final.get("eval_auc", float("nan"))):
    logging.info("Final test AUC %.4f, logloss %.4f", final["eval_auc"],
                 final["eval_logloss"])
  return summary
