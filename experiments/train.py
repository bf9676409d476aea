"""Trains a recommender with persia_jax.

  python experiments/train.py --config=configs/criteo_dlrm.py --workdir=/tmp/run
  python experiments/train.py --config=configs/criteo_dlrm.py --workdir=/tmp/run \
      --config.mode=sync --config.num_train_steps=200

Hyperparameters change only through `--config.FIELD=VALUE`. A run resumes from
the workdir's latest checkpoint automatically.
"""

import os
import signal
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from persia_jax.training import trainer  # pylint: disable=g-import-not-at-top

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to an ml_collections config file, e.g. configs/criteo_dlrm.py.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
flags.mark_flags_as_required(["config", "workdir"])


def _interrupt_on_sigterm(signum, frame):
  del frame
  raise KeyboardInterrupt(f"signal {signum}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  trainer.quiet_library_logs()
  # `kill` stops the run like Ctrl-C does, and status.json records "interrupted".
  signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
  try:
    summary = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except KeyboardInterrupt:
    if _CONFIG.value.checkpoint_every_steps:
      logging.warning("Interrupted. Rerun the same command to resume from the latest"
                      " checkpoint in %s.", _WORKDIR.value)
    else:
      logging.warning("Interrupted. Checkpoints are off, so a rerun starts from step 0;"
                      " set --config.checkpoint_every_steps=N to make runs resumable.")
    sys.exit(130)
  logging.info("Summary: %s", summary)
  print(f"Mode {summary['mode']}: test AUC {summary.get('eval_auc', float('nan')):.4f},"
        f" test logloss {summary.get('eval_logloss', float('nan')):.4f}"
        f" after {summary['steps']} steps in {summary['wall_seconds']:.0f} s.")
  print(f"Workdir: {summary['workdir']}")


if __name__ == "__main__":
  app.run(main)
