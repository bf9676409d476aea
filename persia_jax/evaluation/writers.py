"""Metric writers for the workdir: JSON lines, TensorBoard event files and absl logs.

All writers implement the CLU `MetricWriter` interface (clu 0.0.12), so trainer
code is written once against `write_scalars(step, {...})`. The workdir layout:

  workdir/metrics.jsonl   one JSON object per write_scalars call: {"step": int, name: value}
  workdir/hparams.json    the hyperparameters given to write_hparams
  workdir/tensorboard/    TensorBoard event files, written with tensorboardX

clu 0.0.12's `clu.metric_writers` package imports TensorFlow in its __init__
(through its summary writer), and this project does not install TensorFlow. So
when TensorFlow is missing the interface module is loaded from clu's file
directly, and TensorBoard files come from tensorboardX, which needs only numpy
and protobuf.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib
import sys
import threading
from typing import Any, Mapping, Optional, Sequence

from absl import logging
import numpy as np


def _load_metric_writer_base() -> type:
  """Returns clu's `MetricWriter` abstract base class without importing TensorFlow."""
  if importlib.util.find_spec("tensorflow") is not None:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
    return metric_writers.MetricWriter
  import clu  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(clu.__file__).parent / "metric_writers" / "interface.py"
  # NOTE: this depends on clu keeping the interface in metric_writers/interface.py,
  # which holds for clu 0.0.12.
  name = "persia_jax.evaluation._clu_interface"
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  sys.modules[name] = module  # so pickle and inspect can find the class
  return module.MetricWriter


MetricWriter = _load_metric_writer_base()

METRICS_FILENAME = "metrics.jsonl"
HPARAMS_FILENAME = "hparams.json"
TENSORBOARD_DIRNAME = "tensorboard"


def to_json_scalar(key: str, value: Any) -> bool | int | float | str | None:
  """Converts a Python, numpy or JAX scalar to a JSON value.

  Non-finite floats become None (JSON null), because NaN and Infinity are not
  valid JSON and break strict readers.
  """
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if isinstance(value, str):
    return value
  array = np.asarray(value)
  if array.size != 1:
    raise ValueError(
        f"Metric {key!r} has shape {array.shape} but scalars must have one element;"
        " reduce it before writing.")
  item = array.reshape(()).item()
  if isinstance(item, bool):
    return item
  if isinstance(item, int):
    return item
  if isinstance(item, float):
    return item if math.isfinite(item) else None
  raise ValueError(f"Metric {key!r} has unsupported type {type(value).__name__}.")


class JsonlWriter(MetricWriter):
  """Appends one JSON object per `write_scalars` call to a JSON-lines file.

  The file is opened in append mode, so a resumed run continues the same file.
  Pass `resume_step` to drop rows with a larger step, which an earlier attempt
  wrote after its last checkpoint; otherwise those rows would appear twice.
  A last line cut short by a crash is removed when the writer opens the file.
  Writes are serialized by a lock, so several threads may share one writer.

  Images, videos, audio, histograms and raw summaries have no JSON form here
  and are skipped with a one-time warning; texts are written like scalars.
  """

  def __init__(self, path: str | os.PathLike, *, resume_step: Optional[int] = None):
    self.path = pathlib.Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._lock = threading.Lock()
    if self.path.exists():
      self._rewrite_existing(resume_step)
    self._file = open(self.path, "a", encoding="utf-8")

  def _rewrite_existing(self, resume_step: Optional[int]) -> None:
    """Repairs a cut-off last line and drops rows after `resume_step`, in place."""
    lines = self.path.read_text(encoding="utf-8").split("\n")
    tail = lines.pop()  # "" when the file ends with a newline, as every complete write does.
    numbered = [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]
    changed = False
    if tail.strip():
      changed = True
      try:
        json.loads(tail)
        numbered.append((len(lines) + 1, tail))  # A complete row that lacks only its newline.
      except json.JSONDecodeError:
        logging.warning("Dropping the incomplete last line of %s: %r", self.path, tail[:200])
    if resume_step is not None:
      kept = []
      for number, line in numbered:
        try:
          step = json.loads(line).get("step")
        except (json.JSONDecodeError, AttributeError) as e:
          raise ValueError(
              f"{self.path}:{number}: invalid metrics row {line[:80]!r}; fix or remove the"
              " line before resuming.") from e
        if step is None or step <= resume_step:
          kept.append((number, line))
      if len(kept) < len(numbered):
        if resume_step:
          logging.info("Dropped %d rows of %s with step > %d, the step this run resumes"
                       " from.", len(numbered) - len(kept), self.path, resume_step)
        else:
          logging.warning("Dropped %d rows of %s left by an earlier run: this run starts"
                          " from step 0.", len(numbered) - len(kept), self.path)
        numbered = kept
        changed = True
    if changed:
      tmp = self.path.with_name(self.path.name + ".tmp")
      tmp.write_text("".join(line + "\n" for _, line in numbered), encoding="utf-8")
      os.replace(tmp, self.path)

  def _write_row(self, row: Mapping[str, Any]) -> None:
    line = json.dumps(row, allow_nan=False)
    with self._lock:
      self._file.write(line + "\n")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    row = {"step": int(step)}
    for key, value in scalars.items():
      row[key] = to_json_scalar(key, value)
    self._write_row(row)

  def write_texts(self, step: int, texts: Mapping[str, str]):
    self._write_row({"step": int(step), **{key: str(text) for key, text in texts.items()}})

  def _skip(self, kind: str):
    logging.log_first_n(logging.WARNING, "JsonlWriter skips %s; use a TensorBoardWriter.", 1,
                        kind)

  def write_summaries(self, step: int, values: Mapping[str, Any],
                      metadata: Optional[Mapping[str, Any]] = None):
    self._skip("raw summaries")

  def write_images(self, step: int, images: Mapping[str, Any]):
    self._skip("images")

  def write_videos(self, step: int, videos: Mapping[str, Any]):
    self._skip("videos")

  def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int):
    self._skip("audios")

  def write_histograms(self, step: int, arrays: Mapping[str, Any],
                       num_buckets: Optional[Mapping[str, int]] = None):
    self._skip("histograms")

  def write_hparams(self, hparams: Mapping[str, Any]):
    """Writes hparams.json next to the metrics file, replacing an earlier one."""
    path = self.path.with_name(HPARAMS_FILENAME)
    path.write_text(json.dumps(dict(hparams), indent=2, sort_keys=True, default=str) + "\n",
                    encoding="utf-8")

  def flush(self):
    with self._lock:
      self._file.flush()
      os.fsync(self._file.fileno())

  def close(self):
    with self._lock:
      if not self._file.closed:
        self._file.flush()
        self._file.close()


class TensorBoardWriter(MetricWriter):
  """Writes TensorBoard event files with tensorboardX, without TensorFlow.

  Args:
    logdir: directory for the event files.
    resume_step: the step the run resumes from; TensorBoard hides events with
      a larger step that an earlier attempt wrote.
  """

  def __init__(self, logdir: str | os.PathLike, *, resume_step: Optional[int] = None):
    import tensorboardX  # pylint: disable=g-import-not-at-top
    purge_step = None if resume_step is None else int(resume_step) + 1
    self._writer = tensorboardX.SummaryWriter(logdir=str(logdir), purge_step=purge_step,
                                              flush_secs=30)

  def write_summaries(self, step: int, values: Mapping[str, Any],
                      metadata: Optional[Mapping[str, Any]] = None):
    logging.log_first_n(logging.WARNING, "TensorBoardWriter skips raw summaries.", 1)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    for key, value in scalars.items():
      scalar = to_json_scalar(key, value)
      if isinstance(scalar, str):
        continue
      self._writer.add_scalar(key, float("nan") if scalar is None else float(scalar),
                              global_step=int(step))

  def write_images(self, step: int, images: Mapping[str, Any]):
    for key, value in images.items():
      array = np.asarray(value)
      if array.ndim == 4:
        self._writer.add_images(key, array, global_step=int(step), dataformats="NHWC")
      else:
        self._writer.add_image(key, array, global_step=int(step), dataformats="HWC")

  def write_videos(self, step: int, videos: Mapping[str, Any]):
    logging.log_first_n(logging.WARNING, "TensorBoardWriter skips videos.", 1)

  def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int):
    for key, value in audios.items():
      self._writer.add_audio(key, np.asarray(value), global_step=int(step),
                             sample_rate=sample_rate)

  def write_texts(self, step: int, texts: Mapping[str, str]):
    for key, text in texts.items():
      self._writer.add_text(key, str(text), global_step=int(step))

  def write_histograms(self, step: int, arrays: Mapping[str, Any],
                       num_buckets: Optional[Mapping[str, int]] = None):
    for key, value in arrays.items():
      buckets = None if num_buckets is None else num_buckets.get(key)
      self._writer.add_histogram(key, np.asarray(value), global_step=int(step),
                                 bins="auto", max_bins=buckets)

  def write_hparams(self, hparams: Mapping[str, Any]):
    # The hparams plugin takes only bool, str, int and float values.
    values = {key: value if isinstance(value, (bool, str, int, float)) else str(value)
              for key, value in hparams.items()}
    self._writer.add_hparams(values, {}, name="hparams")

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


class LoggingWriter(MetricWriter):
  """Logs scalars and texts with absl.logging; other kinds are skipped."""

  def write_summaries(self, step: int, values: Mapping[str, Any],
                      metadata: Optional[Mapping[str, Any]] = None):
    pass

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    parts = []
    for key, value in sorted(scalars.items()):
      scalar = to_json_scalar(key, value)
      parts.append(f"{key}={scalar:.6g}" if isinstance(scalar, float) else f"{key}={scalar}")
    logging.info("[%d] %s", int(step), ", ".join(parts))

  def write_images(self, step: int, images: Mapping[str, Any]):
    pass

  def write_videos(self, step: int, videos: Mapping[str, Any]):
    pass

  def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int):
    pass

  def write_texts(self, step: int, texts: Mapping[str, str]):
    for key, text in texts.items():
      logging.info("[%d] %s: %s", int(step), key, text)

  def write_histograms(self, step: int, arrays: Mapping[str, Any],
                       num_buckets: Optional[Mapping[str, int]] = None):
    pass

  def write_hparams(self, hparams: Mapping[str, Any]):
    logging.info("Hyperparameters: %s", dict(hparams))

  def flush(self):
    pass

  def close(self):
    pass


class MultiWriter(MetricWriter):
  """Forwards every call to each of several writers, in order."""

  def __init__(self, writers: Sequence[MetricWriter]):
    self.writers = list(writers)

  def write_summaries(self, step, values, metadata=None):
    for writer in self.writers:
      writer.write_summaries(step, values, metadata)

  def write_scalars(self, step, scalars):
    for writer in self.writers:
      writer.write_scalars(step, scalars)

  def write_images(self, step, images):
    for writer in self.writers:
      writer.write_images(step, images)

  def write_videos(self, step, videos):
    for writer in self.writers:
      writer.write_videos(step, videos)

  def write_audios(self, step, audios, *, sample_rate):
    for writer in self.writers:
      writer.write_audios(step, audios, sample_rate=sample_rate)

  def write_texts(self, step, texts):
    for writer in self.writers:
      writer.write_texts(step, texts)

  def write_histograms(self, step, arrays, num_buckets=None):
    for writer in self.writers:
      writer.write_histograms(step, arrays, num_buckets)

  def write_hparams(self, hparams):
    for writer in self.writers:
      writer.write_hparams(hparams)

  def flush(self):
    for writer in self.writers:
      writer.flush()

  def close(self):
    for writer in self.writers:
      writer.close()


def create_default_writer(workdir: str | os.PathLike, *, tensorboard: bool = True,
                          log: bool = True, resume_step: Optional[int] = None) -> MultiWriter:
  """Creates the workdir's writer: metrics.jsonl, TensorBoard files and absl logs.

  Args:
    workdir: run directory; created if missing.
    tensorboard: also write event files under workdir/tensorboard. When
      tensorboardX is not installed this logs a warning and writes none.
    log: also log every scalar write with absl.logging.
    resume_step: the step a resumed run continues from; rows and events with a
      larger step, left by an earlier attempt, are dropped or hidden.

  Returns:
    A MultiWriter; call `close()` at the end of the run.
  """
  workdir = pathlib.Path(workdir)
  writers: list[MetricWriter] = [JsonlWriter(workdir / METRICS_FILENAME,
                                             resume_step=resume_step)]
  if tensorboard:
    if importlib.util.find_spec("tensorboardX") is None:
      logging.warning("tensorboardX is not installed, so no TensorBoard files are written;"
                      " `pip install tensorboardX` to get them.")
    else:
      writers.append(TensorBoardWriter(workdir / TENSORBOARD_DIRNAME, resume_step=resume_step))
  if log:
    writers.append(LoggingWriter())
  return MultiWriter(writers)
