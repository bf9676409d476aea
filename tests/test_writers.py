"""Tests for the workdir metric writers and the progress logger."""

import inspect
import json
import logging
import math
import pathlib
import struct
import threading

import jax.numpy as jnp
import numpy as np
import pytest

from persia_jax.evaluation import progress
from persia_jax.evaluation import writers


def read_rows(path):
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def read_tensorboard_scalars(logdir):
  """Parses TFRecord-framed event files into {(tag, step): value}, without TensorFlow."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  scalars = {}
  for path in sorted(pathlib.Path(logdir).glob("events.out.tfevents.*")):
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      record = data[offset + 12:offset + 12 + length]
      offset += 12 + length + 4  # length, its CRC, payload, payload CRC
      event = event_pb2.Event.FromString(record)
      for value in event.summary.value:
        scalars[(value.tag, event.step)] = value.simple_value
  return scalars


def test_writers_implement_clu_interface():
  assert inspect.getfile(writers.MetricWriter).endswith("clu/metric_writers/interface.py")
  for cls in (writers.JsonlWriter, writers.TensorBoardWriter, writers.LoggingWriter,
              writers.MultiWriter):
    assert issubclass(cls, writers.MetricWriter), cls
    assert not inspect.isabstract(cls), cls


def test_jsonl_writes_one_row_per_call(tmp_path):
  path = tmp_path / "metrics.jsonl"
  writer = writers.JsonlWriter(path)
  writer.write_scalars(10, {"loss": jnp.float32(0.5), "examples": np.int64(128)})
  writer.write_scalars(20, {"eval_auc": 0.75})
  writer.close()
  assert read_rows(path) == [{"step": 10, "loss": 0.5, "examples": 128},
                             {"step": 20, "eval_auc": 0.75}]


def test_jsonl_writes_non_finite_as_null(tmp_path):
  path = tmp_path / "metrics.jsonl"
  writer = writers.JsonlWriter(path)
  writer.write_scalars(1, {"auc": float("nan"), "loss": np.float32("inf")})
  writer.close()
  assert read_rows(path) == [{"step": 1, "auc": None, "loss": None}]


def test_jsonl_rejects_non_scalar(tmp_path):
  writer = writers.JsonlWriter(tmp_path / "metrics.jsonl")
  with pytest.raises(ValueError, match="Metric 'loss' has shape \\(2,\\)"):
    writer.write_scalars(1, {"loss": np.zeros(2)})
  writer.close()


def test_jsonl_appends_across_writers(tmp_path):
  path = tmp_path / "metrics.jsonl"
  first = writers.JsonlWriter(path)
  first.write_scalars(1, {"loss": 1.0})
  first.close()
  second = writers.JsonlWriter(path)
  second.write_scalars(2, {"loss": 0.5})
  second.close()
  assert [row["step"] for row in read_rows(path)] == [1, 2]


def test_jsonl_resume_drops_later_rows(tmp_path):
  path = tmp_path / "metrics.jsonl"
  first = writers.JsonlWriter(path)
  for step in (1, 2, 3, 4):
    first.write_scalars(step, {"loss": float(step)})
  first.close()
  resumed = writers.JsonlWriter(path, resume_step=2)
  resumed.write_scalars(3, {"loss": 30.0})
  resumed.close()
  assert [(row["step"], row["loss"]) for row in read_rows(path)] == [
      (1, 1.0), (2, 2.0), (3, 30.0)]


def test_jsonl_drops_incomplete_last_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
  writer = writers.JsonlWriter(path)
  writer.write_scalars(2, {"loss": 2.0})
  writer.close()
  assert read_rows(path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}]


def test_jsonl_writes_texts_and_hparams(tmp_path):
  path = tmp_path / "metrics.jsonl"
  writer = writers.JsonlWriter(path)
  writer.write_texts(5, {"status": "done"})
  writer.write_hparams({"learning_rate": 0.1, "hidden_sizes": (4, 2)})
  writer.close()
  assert read_rows(path) == [{"step": 5, "status": "done"}]
  hparams = json.loads((tmp_path / "hparams.json").read_text())
  assert hparams == {"learning_rate": 0.1, "hidden_sizes": [4, 2]}


def test_tensorboard_scalars_readable(tmp_path):
  pytest.importorskip("tensorboardX")
  writer = writers.TensorBoardWriter(tmp_path / "tb")
  writer.write_scalars(3, {"loss": 0.25, "eval_auc": jnp.float32(0.75)})
  writer.write_scalars(4, {"loss": 0.125})
  writer.close()
  scalars = read_tensorboard_scalars(tmp_path / "tb")
  assert scalars[("loss", 3)] == pytest.approx(0.25)
  assert scalars[("eval_auc", 3)] == pytest.approx(0.75)
  assert scalars[("loss", 4)] == pytest.approx(0.125)


def test_default_writer_fills_workdir(tmp_path):
  pytest.importorskip("tensorboardX")
  writer = writers.create_default_writer(tmp_path, log=True)
  writer.write_scalars(7, {"loss": 0.5})
  writer.close()
  assert read_rows(tmp_path / "metrics.jsonl") == [{"step": 7, "loss": 0.5}]
  scalars = read_tensorboard_scalars(tmp_path / "tensorboard")
  assert scalars[("loss", 7)] == pytest.approx(0.5)


def test_default_writer_without_tensorboard(tmp_path):
  writer = writers.create_default_writer(tmp_path, tensorboard=False, log=False)
  writer.write_scalars(1, {"loss": 0.5})
  writer.close()
  assert not (tmp_path / "tensorboard").exists()
  assert read_rows(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 0.5}]


class FakeClock:

  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def test_progress_reports_every_steps(caplog):
  clock = FakeClock()
  logger = progress.ProgressLogger(total_steps=100, batch_size=32, every_steps=10, clock=clock)
  clock.now += 4.0
  assert logger.update(9, loss=0.7) is None
  clock.now += 1.0
  with caplog.at_level(logging.INFO, logger="absl"):
    rates = logger.update(10, loss=0.5)
  # 10 steps in 5 seconds; 90 steps remain.
  assert rates["steps_per_sec"] == pytest.approx(2.0)
  assert rates["samples_per_sec"] == pytest.approx(64.0)
  assert rates["eta_secs"] == pytest.approx(45.0)
  assert "step 10/100 (10.0%)" in caplog.text
  assert "loss=0.5" in caplog.text
  assert "ETA 45s" in caplog.text


def test_progress_rates_cover_last_interval_only():
  clock = FakeClock()
  logger = progress.ProgressLogger(total_steps=100, batch_size=1, every_steps=10, clock=clock)
  clock.now += 50.0  # A slow first interval, e.g. compilation.
  logger.update(10)
  clock.now += 2.0
  rates = logger.update(20)
  assert rates["steps_per_sec"] == pytest.approx(5.0)


def test_progress_reports_every_secs():
  clock = FakeClock()
  logger = progress.ProgressLogger(total_steps=1000, batch_size=8, every_secs=10.0, clock=clock,
                                   start_step=100)
  clock.now += 9.0
  assert logger.update(103) is None
  clock.now += 1.0
  rates = logger.update(105)
  # 5 steps since start_step 100, in 10 seconds.
  assert rates["steps_per_sec"] == pytest.approx(0.5)
  assert rates["eta_secs"] == pytest.approx(895 / 0.5)


def test_progress_reports_last_step():
  clock = FakeClock()
  logger = progress.ProgressLogger(total_steps=15, batch_size=1, every_steps=10, clock=clock)
  clock.now += 1.0
  logger.update(10)
  clock.now += 1.0
  rates = logger.update(15)
  assert rates["eta_secs"] == 0.0


def test_progress_requires_an_interval():
  with pytest.raises(ValueError, match="every_steps or every_secs"):
    progress.ProgressLogger(total_steps=10, batch_size=1)


@pytest.mark.parametrize("seconds, text", [(12.4, "12s"), (245, "4m05s"), (7380, "2h03m"),
                                           (math.nan, "?")])
def test_format_duration(seconds, text):
  assert progress.format_duration(seconds) == text


def test_jsonl_keeps_complete_last_line_without_newline(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 1.0}')
  writer = writers.JsonlWriter(path)
  writer.write_scalars(2, {"loss": 2.0})
  writer.close()
  assert read_rows(path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}]


def test_jsonl_resume_reports_invalid_row(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl:2: invalid metrics row"):
    writers.JsonlWriter(path, resume_step=2)


def test_jsonl_concurrent_writes_stay_whole_lines(tmp_path):
  path = tmp_path / "metrics.jsonl"
  writer = writers.JsonlWriter(path)

  def write_many(thread_index):
    for step in range(200):
      writer.write_scalars(step, {f"thread_{thread_index}": float(step), "pad": "x" * 500})

  threads = [threading.Thread(target=write_many, args=(i,)) for i in range(4)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  writer.close()
  rows = read_rows(path)
  assert len(rows) == 800
  for i in range(4):
    assert sorted(row["step"] for row in rows if f"thread_{i}" in row) == list(range(200))
