"""Input pipeline: readers, the feature schema, streaming, prefetch and synthetic data.

The trainer calls only `build_input`:

  it = build_input(criteo_config(), split="train", batch_size=1024, seed=0)
  for batch in it:   # persia_jax.data.batch.Batch
    ...
  state = it.state_dict()   # JSON-serializable; it.load_state_dict(state) resumes.
  it.close()

"train" is shuffled by `seed` and repeats for `num_epochs` epochs (None: no
end). "test" is one pass in file order without shuffling, and its last
partial batch is kept.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from persia_jax.data.batch import Batch, SparseInput
from persia_jax.data.configs import (adult_config, avazu_config, criteo_config,
                                     libsvm_config, synthetic_config, taobao_config)
from persia_jax.data.parsing import DataError
from persia_jax.data.pipeline import BatchIterator, Stream
from persia_jax.data.schema import (DenseColumn, LabelColumn, Schema, SparseColumn,
                                    schema_from_config)
from persia_jax.data.sources import ParquetSource, TextSource, expand_files

__all__ = [
    "Batch", "BatchIterator", "DataError", "DenseColumn", "LabelColumn", "Schema",
    "SparseColumn", "SparseInput", "adult_config", "avazu_config", "build_input",
    "build_source", "criteo_config", "libsvm_config", "synthetic_config",
    "taobao_config",
]

_ROW_COUNT_CACHE: dict[tuple, tuple[int, Any]] = {}
_ROW_COUNT_LOCK = threading.Lock()


def build_source(data_config: Any, files: list[str] | None = None) -> Any:
  """Builds the reader of `data_config.format` over `files` (default: data_config.files)."""
  data_format = data_config.format
  if data_format == "synthetic":
    from persia_jax.data.synthetic import SyntheticSource  # pylint: disable=g-import-not-at-top
    return SyntheticSource(data_config)
  schema = schema_from_config(data_config)
  if data_config.on_bad_row not in ("error", "skip"):
    raise ValueError(f"data.on_bad_row must be 'error' or 'skip', got {data_config.on_bad_row!r}.")
  if files is None:
    files = expand_files(data_config.files)
  if data_format == "csv":
    columns = data_config.columns
    return TextSource(files, schema, columns=None if columns is None else list(columns),
                      delimiter=data_config.delimiter, header=bool(data_config.header),
                      block_size=data_config.block_size, on_bad_row=data_config.on_bad_row)
  if data_format == "parquet":
    return ParquetSource(files, schema, block_size=data_config.block_size,
                         on_bad_row=data_config.on_bad_row)
  if data_format == "libsvm":
    from persia_jax.data.libsvm import LibsvmSource  # pylint: disable=g-import-not-at-top
    return LibsvmSource(files, schema, num_fields=int(data_config.get("num_fields", 1)),
                        minus_one_is_negative=bool(
                            data_config.get("libsvm_minus_one_is_negative", True)),
                        block_size=data_config.block_size, on_bad_row=data_config.on_bad_row)
  raise ValueError(
      f"Unknown data.format {data_format!r}; expected 'csv', 'parquet', 'libsvm' or 'synthetic'.")


def _row_count(source: Any, file_index: int, split_row: int | None) -> tuple[int, Any]:
  path = source.files[file_index]
  stat = os.stat(path)
  key = (path, stat.st_size, stat.st_mtime_ns, getattr(source, "header", False), split_row)
  with _ROW_COUNT_LOCK:
    if key in _ROW_COUNT_CACHE:
      return _ROW_COUNT_CACHE[key]
  result = source.row_count(file_index, split_row)
  with _ROW_COUNT_LOCK:
    _ROW_COUNT_CACHE[key] = result
  return result


def _split_ranges(source: Any, split: str, test_fraction: float
                  ) -> tuple[list[tuple[int, int, dict | None]], int]:
  """Returns per file (lo, hi, cursor of row lo) of the split's data rows, and the number of empty files.

  The first round(total * (1 - test_fraction)) rows, counting files in sorted
  order, are "train"; the rest are "test".
  """
  counts = [_row_count(source, i, None)[0] for i in range(len(source.files))]
  empty_files = 0
  for i, count in enumerate(counts):
    if count == 0:
      # Reading an empty file raises DataError, unless on_bad_row is "skip".
      for _ in source.blocks(i, source.start_cursor(i)):
        pass
      empty_files += 1
  total = sum(counts)
  num_train = int(round(total * (1.0 - test_fraction)))
  ranges = []
  first = 0
  for i, count in enumerate(counts):
    boundary = min(max(num_train - first, 0), count)
    if split == "train":
      ranges.append((0, boundary, None))
    else:
      cursor = None
      if 0 < boundary < count:
        cursor = _row_count(source, i, boundary)[1]
      ranges.append((boundary, count, cursor))
    first += count
  return ranges, empty_files


def build_input(data_config: Any, *, split: str, batch_size: int, seed: int = 0,
                process_index: int = 0, process_count: int = 1) -> BatchIterator:
  """Builds the batch iterator of one split for one data-parallel process.

  Args:
    data_config: an `ml_collections.ConfigDict` such as `criteo_config()`.
    split: "train" (shuffled by `seed`, `num_epochs` epochs) or "test" (one
      pass in file order, not shuffled).
    batch_size: rows per batch for this process.
    seed: shuffling seed.
    process_index, process_count: this process among the data-parallel
      processes; together they read every row of an epoch exactly once.

  Returns:
    A `BatchIterator` of `Batch`es; close it (or use `with`) when done.

  Raises:
    ValueError: on an invalid config or split.
    FileNotFoundError: if a data file is missing.
    DataError: on invalid data, when a block is parsed (during iteration).
  """
  if split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
  empty_files = 0
  test_files = data_config.get("test_files") or ""
  test_fraction = float(data_config.get("test_fraction") or 0.0)
  if data_config.format == "synthetic":
    source = build_source(data_config).for_split(split, int(process_index), int(process_count))
    ranges = source.split_ranges(split)
  elif test_files:
    files = expand_files(test_files if split == "test" else data_config.files)
    source = build_source(data_config, files)
    ranges = [(0, -1, None)] * len(files)
  elif test_fraction > 0.0:
    if not 0.0 < test_fraction < 1.0:
      raise ValueError(f"data.test_fraction must be in [0, 1), got {test_fraction}.")
    source = build_source(data_config)
    ranges, empty_files = _split_ranges(source, split, test_fraction)
  elif split == "test":
    raise ValueError("The data config has no test split: set data.test_files or"
                     " data.test_fraction > 0.")
  else:
    source = build_source(data_config)
    ranges = [(0, -1, None)] * len(source.files)

  train = split == "train"
  stream = Stream(
      source, ranges, split=split, batch_size=int(batch_size), seed=int(seed),
      shuffle=train and bool(data_config.get("shuffle", True)),
      shuffle_buffer=int(data_config.get("shuffle_buffer", 65536)),
      num_epochs=data_config.get("num_epochs", 1) if train else 1,
      drop_remainder=bool(data_config.get("drop_remainder", False)),
      process_index=int(process_index), process_count=int(process_count),
      num_parse_threads=int(data_config.get("num_parse_threads", 2)),
      parse_ahead=2 * int(data_config.get("num_parse_threads", 2)))
  if empty_files:
    stream.report["rows_skipped"]["empty_file"] = empty_files
  return BatchIterator(stream, prefetch=int(data_config.get("prefetch", 4)))
