"""Hashed logistic regression on the committed Criteo slice: the baseline for DLRM.

Run (from the repository root):
  python experiments/train.py --config=configs/criteo_lr.py --workdir=workdirs/criteo_lr

Every hashed categorical value gets one weight (an embedding row of dim 1,
trained with Adagrad) and the 13 transformed integer features a linear weight
each. The README compares its test AUC with the default DLRM config, both
measured by experiments/compare_modes.py.
"""

import ml_collections

from configs import criteo_dlrm


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config; `arg="runlocal"` shrinks it to a smoke run."""
  options = criteo_dlrm.parse_arg(arg)
  if "model" in options:
    raise ValueError("configs/criteo_lr.py is the logistic regression config; use"
                     " configs/criteo_dlrm.py:model=NAME for other models.")
  config = criteo_dlrm.get_config(",".join(["model=logistic"] + list(options)))
  config.mode = "sync"
  config.embedding_staleness = 0
  table = config.embedding.tables.criteo
  table.dim = 1
  table.init_scale = 0.0  # weights start at zero, as usual for logistic regression
  table.optimizer.learning_rate = 0.1
  if "runlocal" not in options:
    config.num_train_steps = 600  # 12 epochs; tuned on this slice, see README
    config.eval_every_steps = 100
    config.log_every_steps = 100
  return config
