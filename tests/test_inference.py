"""Export and prediction: scores match the trainer, unknown IDs do not grow the store."""

import subprocess
import sys

import jax
import numpy as np
import pytest

from persia_jax import data as data_lib
from persia_jax.training import inference
from persia_jax.training import trainer as trainer_lib
from tests.trainer_helpers import REPO_ROOT, small_config

CRITEO_SLICE = REPO_ROOT / "data" / "criteo" / "train_head8k.txt"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  config = small_config(mode="hybrid", embedding_staleness=2, num_train_steps=20)
  summary = trainer_lib.train_and_evaluate(config, str(workdir))
  return workdir / "export", summary


def _write_rows(path, lines):
  path.write_text("".join(lines))
  return path


def test_predictions_match_trainer_eval(exported, tmp_path):
  export_dir, _ = exported
  lines = CRITEO_SLICE.read_text().splitlines(keepends=True)[:300]
  input_path = _write_rows(tmp_path / "rows.txt", lines)
  predictor = inference.Predictor(export_dir, batch_size=128)
  output = tmp_path / "predictions.txt"
  count = inference.predict_file(predictor, str(input_path), str(output))
  predictions = np.loadtxt(output)
  assert count == 300
  assert predictions.shape == (300,)

  # The same rows scored by hand through the loaded stores and parameters.
  data_config = data_lib.criteo_config(files=str(input_path), test_files=str(input_path))
  with data_lib.build_input(data_config, split="test", batch_size=300) as batches:
    batch = next(iter(batches))
  dense_batch, _, _ = trainer_lib.prepare_batch(
      predictor.worker, predictor.dense, batch, train=False, pad_to=300)
  logits = np.asarray(predictor.dense.eval_step(predictor.params, dense_batch))
  np.testing.assert_allclose(predictions, np.asarray(jax.nn.sigmoid(logits)), atol=2e-6)


def test_unknown_ids_do_not_grow_store(exported, tmp_path):
  export_dir, _ = exported
  predictor = inference.Predictor(export_dir, batch_size=128)
  store = predictor.stores["criteo"]
  rows_before = len(store)
  stats_before = store.stats()
  # Replace every categorical value with one the model never saw.
  lines = []
  for i, line in enumerate(CRITEO_SLICE.read_text().splitlines()[:50]):
    fields = line.split("\t")
    fields[14:] = [f"unseen{i:04d}{j:02d}" for j in range(26)]
    lines.append("\t".join(fields) + "\n")
  input_path = _write_rows(tmp_path / "unseen.txt", lines)
  inference.predict_file(predictor, str(input_path), str(tmp_path / "out.txt"))
  stats_after = store.stats()
  assert len(store) == rows_before
  assert stats_after["inserts"] == stats_before["inserts"]
  assert stats_after["eval_misses"] - stats_before["eval_misses"] == 50 * 26


def test_predict_script_writes_one_line_per_row(exported, tmp_path):
  export_dir, _ = exported
  lines = CRITEO_SLICE.read_text().splitlines(keepends=True)[:37]
  input_path = _write_rows(tmp_path / "rows.txt", lines)
  output = tmp_path / "scores.txt"
  result = subprocess.run(
      [sys.executable, str(REPO_ROOT / "experiments" / "predict.py"),
       f"--export_dir={export_dir}", f"--input={input_path}", f"--output={output}",
       "--batch_size=16"], capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert len(output.read_text().splitlines()) == 37


def test_missing_export_is_reported(tmp_path):
  with pytest.raises(FileNotFoundError, match="export.json is missing"):
    inference.Predictor(tmp_path)


def test_unlabelled_rows_score_like_labelled(exported, tmp_path):
  export_dir, _ = exported
  lines = CRITEO_SLICE.read_text().splitlines()[:40]
  labelled = _write_rows(tmp_path / "labelled.txt", [line + "\n" for line in lines])
  unlabelled = _write_rows(tmp_path / "unlabelled.txt",
                           [line.split("\t", 1)[1] + "\n" for line in lines])
  predictor = inference.Predictor(export_dir, batch_size=128)
  inference.predict_file(predictor, str(labelled), str(tmp_path / "a.txt"))
  count = inference.predict_file(predictor, str(unlabelled), str(tmp_path / "b.txt"),
                                 labelled=False)
  assert count == 40
  np.testing.assert_array_equal(np.loadtxt(tmp_path / "a.txt"), np.loadtxt(tmp_path / "b.txt"))


def test_malformed_row_stops_prediction(exported, tmp_path):
  export_dir, _ = exported
  lines = CRITEO_SLICE.read_text().splitlines(keepends=True)[:10]
  lines[4] = "2" + lines[4][1:]
  input_path = _write_rows(tmp_path / "bad.txt", lines)
  predictor = inference.Predictor(export_dir, batch_size=128)
  with pytest.raises(data_lib.DataError, match="line 5, column 'label'") as raised:
    inference.predict_file(predictor, str(input_path), str(tmp_path / "out.txt"))
  assert "prediction does not skip rows" in str(raised.value)
  assert "on_bad_row" not in str(raised.value)
  assert not (tmp_path / "out.txt").exists()
  assert not (tmp_path / "out.txt.tmp").exists()


def test_unlabelled_file_without_flag_hints(exported, tmp_path):
  export_dir, _ = exported
  lines = [line.split("\t", 1)[1] + "\n" for line in CRITEO_SLICE.read_text().splitlines()[:5]]
  input_path = _write_rows(tmp_path / "unlabelled.txt", lines)
  predictor = inference.Predictor(export_dir, batch_size=128)
  with pytest.raises(data_lib.DataError, match="pass --nolabelled"):
    inference.predict_file(predictor, str(input_path), str(tmp_path / "out.txt"))
