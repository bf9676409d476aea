"""Small training configs and runners shared by the trainer and inference tests."""

import pathlib

from configs import criteo_dlrm
from persia_jax.training import trainer as trainer_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def small_config(**overrides):
  config = criteo_dlrm.get_config()
  config.batch_size = 64
  config.eval_batch_size = 512
  config.num_train_steps = 12
  config.log_every_steps = 4
  config.eval_every_steps = 0
  config.model.bottom_mlp_sizes = (32,)
  config.model.top_mlp_sizes = (32,)
  config.embedding.tables.criteo.dim = 16
  config.update(overrides)
  return config


def run(config, workdir=None, steps=None):
  trainer = trainer_lib.Trainer(config, workdir)
  try:
    trainer.train(num_steps=steps) if steps else trainer.train()
  finally:
    trainer.close()
  return trainer
