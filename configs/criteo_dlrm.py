"""DLRM on the committed Criteo slice, hybrid mode: the default experiment.

Run (from the repository root):
  python experiments/train.py --config=configs/criteo_dlrm.py --workdir=workdirs/criteo_dlrm

Other modes:  --config.mode=sync   or   --config.mode=async --config.dense_staleness=4
Other models: --config=configs/criteo_dlrm.py:model=dcn_v2 (dnn, deepfm, wide_deep,
              logistic), each with its default hyperparameters
CPU smoke run: --config=configs/criteo_dlrm.py:runlocal (combine: :model=dnn,runlocal)

The slice is the first 8,000 rows of Criteo's Kaggle `train.txt`: 6,400 train
and 1,600 test rows in file order. Expected runtime and test AUC are listed in
README.md, measured by experiments/compare_modes.py.
"""

import ml_collections

from persia_jax import data as data_lib
from persia_jax import models as models_lib


def parse_arg(arg: str | None) -> dict[str, str]:
  """Parses "runlocal,model=dnn" into {"runlocal": "", "model": "dnn"}."""
  options = {}
  for item in (arg or "").split(","):
    if item:
      key, _, value = item.partition("=")
      key = key.strip()
      if key in options:
        raise ValueError(f"Config argument {key!r} is given twice in {arg!r}.")
      if key == "model" and not value.strip():
        raise ValueError(f"Config argument 'model=' needs a model name, got {arg!r}.")
      options[key] = value.strip()
  unknown = sorted(set(options) - {"runlocal", "model"})
  if unknown:
    raise ValueError(f"Unknown config arguments {unknown} in {arg!r}; expected runlocal"
                     " and/or model=NAME, separated by commas.")
  return options


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config.

  Args:
    arg: comma-separated options: "runlocal" shrinks the run to a seconds-long
      smoke run; "model=NAME" swaps in another model with its defaults.
  """
  options = parse_arg(arg)
  config = ml_collections.ConfigDict()
  config.seed = 0

  # Training schedule. "hybrid": synchronous dense, asynchronous embeddings.
  config.mode = "hybrid"
  config.embedding_staleness = 4     # tau: max unapplied earlier batches at a lookup
  config.dense_staleness = 0         # async mode only: dense gradient delay in steps
  config.deterministic_replay = False  # hybrid/async: apply batch t before lookup t+tau+1
  config.num_update_threads = 2      # background threads applying embedding gradients

  config.batch_size = 128            # global batch, divisible by the device count
  config.eval_batch_size = 1024
  config.num_train_steps = 150       # 3 epochs of the 6,400 train rows
  config.log_every_steps = 25
  config.eval_every_steps = 25
  config.checkpoint_every_steps = 0  # 0: no checkpoints
  config.keep_checkpoints = 2        # newest checkpoints kept; 0 keeps all
  config.num_devices = 0             # 0: all local devices
  config.restore_from = ""           # initial weights from another run's checkpoint
  config.export = True               # write <workdir>/export for experiments/predict.py

  # Input: the committed Criteo slice.
  config.data = data_lib.criteo_config(num_epochs=None)  # num_train_steps ends the run

  # Embedding parameter server: one table shared by C1..C26. The feature hash
  # includes the column name, so equal values in two columns get two rows.
  config.embedding = ml_collections.ConfigDict()
  config.embedding.wire_dtype = "float32"   # or float16 / bfloat16 between store and dense step
  config.embedding.default_table = "criteo"
  config.embedding.default_pooling = "sum"
  config.embedding.tables = ml_collections.ConfigDict()
  config.embedding.tables.criteo = ml_collections.ConfigDict(dict(
      dim=16,
      num_shards=4,
      capacity=0,          # rows; 0 = unbounded
      init_scale=0.01,
      optimizer=dict(name="adagrad", learning_rate=0.05, initial_accumulator=0.1),
  ))

  # Dense towers.
  config.model = models_lib.default_model_config(options.get("model") or "dlrm")
  config.optimizer = ml_collections.ConfigDict(dict(
      name="adam", learning_rate=1e-3, warmup_steps=0, grad_clip_norm=0.0))

  if "runlocal" in options:
    config.num_train_steps = 20
    config.log_every_steps = 5
    config.eval_every_steps = 10
    if config.model.name == "dnn":
      config.model.hidden_sizes = (256, 128)
  return config
