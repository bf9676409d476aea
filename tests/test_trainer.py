"""The training loop: modes against each other, devices, resume and failure handling.

All runs use the committed Criteo slice with a small DLRM so each takes seconds.
"""

import json

import jax
import numpy as np
import pytest

from persia_jax.training import checkpoint as checkpoint_lib
from persia_jax.training import trainer as trainer_lib
from tests.trainer_helpers import run, small_config


def probe_ids(trainer, num=2000):
  """Returns uint64 IDs of the first rows of the train split, across all features."""
  from persia_jax import data as data_lib
  with data_lib.build_input(trainer.config.data, split="test", batch_size=num) as batches:
    batch = next(iter(batches))
  return np.concatenate([s.ids for s in batch.sparse.values()])


def rows(trainer, ids):
  return trainer.stores["criteo"].lookup(ids, train=False)


def assert_trees_equal(a, b, **tolerance):
  flat_a, tree_a = jax.tree.flatten(a)
  flat_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(flat_a, flat_b):
    if tolerance:
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tolerance)
    else:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sync_one_device_equals_four_devices():
  one = run(small_config(mode="sync", num_devices=1))
  four = run(small_config(mode="sync", num_devices=4))
  assert one.mesh.devices.size == 1
  assert four.mesh.devices.size == 4
  # Four devices sum the batch in another order, so float32 results differ by
  # rounding only; 12 Adam steps keep that below 1e-5.
  assert_trees_equal(one.state.params, four.state.params, rtol=1e-4, atol=1e-5)
  ids = probe_ids(one)
  np.testing.assert_allclose(rows(one, ids), rows(four, ids), rtol=1e-4, atol=1e-6)


def test_hybrid_with_zero_staleness_equals_sync():
  sync = run(small_config(mode="sync", num_devices=1))
  hybrid = run(small_config(mode="hybrid", embedding_staleness=0, num_devices=1))
  assert_trees_equal(sync.state.params, hybrid.state.params)
  ids = probe_ids(sync)
  np.testing.assert_array_equal(rows(sync, ids), rows(hybrid, ids))


def test_replay_zero_staleness_equals_sync():
  sync = run(small_config(mode="sync", num_devices=1))
  replay = run(small_config(mode="hybrid", embedding_staleness=0, deterministic_replay=True,
                            num_devices=1))
  assert_trees_equal(sync.state.params, replay.state.params)


def test_replay_is_reproducible_and_stale():
  config = small_config(mode="hybrid", embedding_staleness=3, deterministic_replay=True,
                        num_devices=1)
  first = run(config)
  second = run(config)
  assert_trees_equal(first.state.params, second.state.params)
  ids = probe_ids(first)
  np.testing.assert_array_equal(rows(first, ids), rows(second, ids))
  sync = run(small_config(mode="sync", num_devices=1))
  assert not np.array_equal(rows(first, ids), rows(sync, ids))


def test_threaded_hybrid_staleness_within_bound(tmp_path):
  config = small_config(mode="hybrid", embedding_staleness=2, log_every_steps=12)
  run(config, tmp_path)
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  train = [r for r in records if "staleness/max" in r]
  assert train
  assert max(r["staleness/max"] for r in train) <= 2


def test_async_mode_runs_with_dense_delay():
  trainer = run(small_config(mode="async", embedding_staleness=2, dense_staleness=2,
                             num_devices=1))
  assert len(trainer.param_history) == 3
  assert trainer.step == 12


@pytest.mark.parametrize("overrides", [
    dict(mode="sync"),
    dict(mode="hybrid", embedding_staleness=2, deterministic_replay=True),
], ids=["sync", "replay"])
def test_resume_equals_uninterrupted(tmp_path, overrides):
  full = run(small_config(num_devices=1, **overrides))

  config = small_config(num_devices=1, checkpoint_every_steps=5, **overrides)
  interrupted = trainer_lib.Trainer(config, tmp_path)
  interrupted.train(num_steps=7)  # checkpoint at step 5; steps 6-7 are lost
  interrupted.close()
  assert checkpoint_lib.list_checkpoints(tmp_path)[-1][0] == 5

  resumed = trainer_lib.Trainer(config, tmp_path)
  assert resumed.step == 5
  resumed.train()
  resumed.close()
  assert resumed.step == 12
  assert_trees_equal(full.state.params, resumed.state.params)
  assert_trees_equal(full.state.opt_state, resumed.state.opt_state)
  ids = probe_ids(full)
  np.testing.assert_array_equal(rows(full, ids), rows(resumed, ids))


def test_metrics_trimmed_on_resume(tmp_path):
  config = small_config(mode="sync", checkpoint_every_steps=4, log_every_steps=2)
  interrupted = trainer_lib.Trainer(config, tmp_path)
  interrupted.train(num_steps=6)
  interrupted.close()
  resumed = trainer_lib.Trainer(config, tmp_path)
  resumed.close()
  steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
  assert max(steps) == 4


def test_end_to_end_criteo_slice(tmp_path):
  config = small_config(mode="hybrid", embedding_staleness=2, num_train_steps=200,
                        batch_size=128, log_every_steps=50)
  summary = trainer_lib.train_and_evaluate(config, str(tmp_path))
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  losses = [r["train_loss"] for r in records if "train_loss" in r]
  assert losses[-1] < losses[0]
  # Measured for this config on 4 CPU devices: 0.721, 0.730 and 0.732 for seeds
  # 0, 1 and 2. The bound leaves room for thread-timing noise and is still 0.15
  # above chance.
  assert summary["eval_auc"] > 0.65
  for name in ("config.json", "metrics.jsonl", "summary.json", "eval_auc.png", "status.json"):
    assert (tmp_path / name).is_file(), name
  assert json.load(open(tmp_path / "status.json"))["status"] == "done"


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path, monkeypatch):
  config = small_config(mode="sync", checkpoint_every_steps=4, log_every_steps=4)
  trainer = trainer_lib.Trainer(config, tmp_path)
  original = trainer.dense.train_step

  def poisoned(state, batch, grad_params=None):
    new_state, grads, metrics = original(state, batch, grad_params)
    if trainer.step >= 6:
      metrics = dict(metrics, loss=metrics["loss"] * np.nan)
    return new_state, grads, metrics

  monkeypatch.setattr(trainer.dense, "train_step", poisoned)
  with pytest.raises(FloatingPointError, match="Non-finite training loss"):
    trainer.train()
  trainer.close()
  assert [step for step, _ in checkpoint_lib.list_checkpoints(tmp_path)] == [4]


def test_batch_size_not_divisible_by_devices():
  with pytest.raises(ValueError, match="not divisible by the 4 devices"):
    trainer_lib.Trainer(small_config(batch_size=66, num_devices=4), None)


def test_dense_staleness_requires_async():
  with pytest.raises(ValueError, match="only applies to config.mode='async'"):
    trainer_lib.validate_config(small_config(mode="hybrid", dense_staleness=2))


def test_four_device_batch_shards():
  trainer = trainer_lib.Trainer(small_config(mode="sync", num_devices=4), None)
  try:
    batch = next(iter(trainer.train_iter))
    dense_batch, _, _ = trainer._prepare(batch, train=True, pad_to=64)
    shards = dense_batch.dense.addressable_shards
    assert len(shards) == 4
    assert {s.data.shape for s in shards} == {(16, trainer.schema.num_dense)}
    embedding_shards = dense_batch.embeddings["C1"].addressable_shards
    assert {s.data.shape for s in embedding_shards} == {(16, 16)}
    assert {s.device for s in embedding_shards} == set(jax.devices()[:4])
    param_shards = jax.tree.leaves(trainer.state.params)[0].addressable_shards
    assert len(param_shards) == 4  # replicated on every device
    assert all(s.data.shape == param_shards[0].data.shape for s in param_shards)
  finally:
    trainer.close()
