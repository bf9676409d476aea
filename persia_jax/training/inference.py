"""Export a trained model and score new data with read-only embedding lookups.

An export directory contains

  config.json       the training config (model, embedding tables, data schema),
  dense/            orbax: the dense parameters only,
  embedding/<table> each store's TensorStore checkpoint.

`Predictor` loads it, builds the model and the stores, and looks rows up with
`train=False`. An ID the store has never seen gets its seeded initial value or
zeros (the table's `unknown_id` setting) and is not inserted, so scoring never
grows the store.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Iterable, Iterator

import jax
import ml_collections
import numpy as np
from absl import logging

from persia_jax import data as data_lib
from persia_jax import models as models_lib
from persia_jax.data import parsing
from persia_jax.data.batch import Batch
from persia_jax.embedding import features as features_lib
from persia_jax.embedding import worker as worker_lib
from persia_jax.training import checkpoint as checkpoint_lib
from persia_jax.training import dense as dense_lib
from persia_jax.training import trainer as trainer_lib


def export_model(trainer, export_dir: str | os.PathLike) -> pathlib.Path:
  """Writes the trainer's dense parameters, stores and config to `export_dir` atomically."""
  trainer.schedule.flush()
  export_dir = pathlib.Path(export_dir)
  with checkpoint_lib.atomic_directory(export_dir) as tmp:
    with open(tmp / "config.json", "w") as f:
      f.write(trainer.config.to_json_best_effort(indent=2))
    with open(tmp / "export.json", "w") as f:
      json.dump({"num_dense": trainer.schema.num_dense, "step": trainer.step,
                 "feature_dims": trainer.feature_dims}, f, indent=2)
    checkpoint_lib.save_dense(tmp / "dense", {"params": trainer.state.params})
    (tmp / "embedding").mkdir()
    for table, store in trainer.stores.items():
      store.save(str(tmp / "embedding" / table))
  logging.info("Exported model to %s", export_dir)
  return export_dir


class Predictor:
  """Scores batches with an exported model; lookups never insert rows.

  Attributes:
    config: the training config stored with the export.
    stores: table name to embedding store, loaded from the export.
  """

  def __init__(self, export_dir: str | os.PathLike, *, num_devices: int = 1,
               batch_size: int = 1024):
    export_dir = pathlib.Path(export_dir)
    if not (export_dir / "export.json").is_file():
      raise FileNotFoundError(
          f"{export_dir} is not a persia_jax export: export.json is missing."
          " experiments/train.py writes one to <workdir>/export when"
          " config.export=True (the default); persia_jax.training.inference.export_model"
          " writes one from a Trainer.")
    with open(export_dir / "config.json") as f:
      self.config = ml_collections.ConfigDict(json.load(f))
    with open(export_dir / "export.json") as f:
      info = json.load(f)
    self.batch_size = batch_size
    self.mesh = dense_lib.create_mesh(num_devices)
    dense_lib.check_batch_size(batch_size, self.mesh, "batch_size")

    tables, feature_specs = features_lib.specs_from_config(self.config.embedding)
    self.stores = features_lib.load_stores(tables, str(export_dir / "embedding"))
    self.worker = worker_lib.EmbeddingWorker(
        feature_specs, self.stores, wire_dtype=self.config.embedding.wire_dtype)
    self.model = models_lib.build_model(
        self.config.model, feature_dims=self.worker.output_dims(),
        num_dense=info["num_dense"])
    self.dense = dense_lib.DenseTrainer(
        self.model, dense_lib.build_optimizer(self.config.optimizer), self.mesh,
        wire_dtype=self.config.embedding.wire_dtype,
        uses_masks=any(f.pooling == "raw" for f in feature_specs))
    restored = checkpoint_lib.restore_dense(export_dir / "dense")
    self.params = dense_lib.replicate(restored["params"], self.mesh)

  def predict_batch(self, batch: Batch) -> np.ndarray:
    """Returns float32 [batch.size] click probabilities; batch.size <= batch_size."""
    if batch.size > self.batch_size:
      raise ValueError(
          f"Batch of {batch.size} rows is larger than the predictor's batch_size"
          f" {self.batch_size}; read the input with batch_size={self.batch_size}.")
    dense_batch, _, num_rows = trainer_lib.prepare_batch(
        self.worker, self.dense, batch, train=False, pad_to=self.batch_size)
    logits = dense_lib.to_host(self.dense.eval_step(self.params, dense_batch))[:num_rows]
    return np.asarray(jax.nn.sigmoid(logits), np.float32)

  def predict(self, batches: Iterable[Batch]) -> Iterator[np.ndarray]:
    for batch in batches:
      yield self.predict_batch(batch)



def predict_file(predictor: Predictor, input_path: str, output_path: str, *,
                 labelled: bool = True) -> int:
  """Scores every row of `input_path` in file order; writes one probability per line.

  A malformed row raises an error naming its file, line and column, because a
  skipped row would shift every later prediction to the wrong line.

  Args:
    predictor: the loaded export.
    input_path: a file in the format the model was trained on.
    output_path: the text file to write, replaced atomically.
    labelled: False for files without the label column, such as Criteo's
      Kaggle `test.txt`.

  Returns:
    The number of predictions written.
  """
  if not pathlib.Path(input_path).is_file():
    raise FileNotFoundError(f"The input file {input_path} does not exist; pass --input=PATH.")
  data_config = ml_collections.ConfigDict(predictor.config.data.to_dict())
  # All rows of the input, in file order, form the "test" split.
  data_config.files = input_path
  data_config.test_files = input_path
  data_config.on_bad_row = "error"
  if not labelled:
    label_column = data_config.label.column
    data_config.label.column = ""
    if data_config.get("columns"):
      data_config.columns = [c for c in data_config.columns if c != label_column]
  count = 0
  output_path = pathlib.Path(output_path)
  output_path.parent.mkdir(parents=True, exist_ok=True)
  tmp = output_path.with_name(output_path.name + ".tmp")
  try:
    with data_lib.build_input(data_config, split="test",
                              batch_size=predictor.batch_size) as batches, open(tmp, "w") as f:
      for batch in batches:
        probabilities = predictor.predict_batch(batch)
        np.savetxt(f, probabilities, fmt="%.6f")
        count += batch.size
  except data_lib.DataError as error:
    tmp.unlink(missing_ok=True)
    # The reader suggests skipping bad rows, which prediction cannot do
    # without shifting later predictions to the wrong lines.
    hint = "Fix or remove the row; prediction does not skip rows."
    if labelled and error.reason == "wrong_field_count":
      hint += " If the file has no label column, pass --nolabelled."
    raise data_lib.DataError(str(error).replace(parsing.SKIP_HINT, hint), path=error.path,
                             line=error.line, column=error.column, value=error.value,
                             reason=error.reason) from None
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
  os.replace(tmp, output_path)
  return count
