"""Tests of feature hashing and the Criteo reader on the committed 8,000-row slice."""

import math
import pathlib
import threading

import numpy as np
import pytest

from persia_jax.data import DataError, build_input, criteo_config, hashing
from persia_jax.data.configs import CRITEO_COLUMNS

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# Lines 1 and 6 of data/criteo/train_head8k.txt, split at tabs by hand.
LINE_1 = ["0", "1", "1", "5", "0", "1382", "4", "15", "2", "181", "1", "2", "", "2",
          "68fd1e64", "80e26c9b", "fb936136", "7b4723c4", "25c83c98", "7e0ccccf",
          "de7995b8", "1f89b562", "a73ee510", "a8cd5504", "b2cb9c98", "37c9c164",
          "2824a5f6", "1adce6ef", "8ba8b39a", "891b62e7", "e5ba7672", "f54016b9",
          "21ddcdc9", "b1252a9d", "07b5194c", "", "3a171ecb", "c5c50484", "e8b83407",
          "9727dd16"]
LINE_6 = ["0", "", "-1", "", "", "12824", "", "0", "0", "6", "", "0", "", "",
          "05db9164", "6c9c9cf3", "2730ec9c", "5400db8b", "43b19349", "6f6d9be8",
          "53b5f978", "0b153874", "a73ee510", "3b08e48b", "91e8fc27", "be45b877",
          "9ff13f22", "07d13a8f", "06969a20", "9bc7fff5", "776ce399", "92555263", "", "",
          "242bb710", "8ec974f4", "be7c41b4", "72c78f11", "", ""]
# Line 6401, the first row of the "test" split.
LINE_6401 = ["0", "", "-1", "73", "1", "0", "", "0", "1", "1", "", "0", "", "0",
             "39af2607", "38d50e09", "209d5876", "75d06342", "25c83c98", "7e0ccccf",
             "7fafef37", "0b153874", "a73ee510", "fbbf2c95", "dbdb7970", "c7a7d614",
             "9be66b48", "b28479f6", "42b3012c", "e106baa6", "1e88c74f", "582152eb",
             "21ddcdc9", "5840adea", "298eb047", "", "3a171ecb", "00ba4790", "001f3601",
             "984e0db0"]


def reference_dense(text: str) -> float:
  """Signed log of the documented transform, computed in plain Python."""
  if text == "":
    return 0.0
  x = int(text)
  return math.log(1 + x) if x > 0 else -math.log(1 - x)


def read_all(config, split):
  with build_input(config, split=split, batch_size=100_000) as iterator:
    batches = list(iterator)
    report = iterator.report
  assert len(batches) == 1
  return batches[0], report


def check_row(batch, index, fields):
  assert batch.labels[index] == float(fields[0])
  expected_dense = np.array([reference_dense(t) for t in fields[1:14]], np.float32)
  np.testing.assert_allclose(batch.dense[index], expected_dense, rtol=1e-6)
  for j, name in enumerate(CRITEO_COLUMNS[14:]):
    got = int(batch.sparse[name].ids[index])
    assert got == hashing.feature_id(name, fields[14 + j]), name


# ----------------------------------------------------------------------------
# Hashing.
# ----------------------------------------------------------------------------
def test_fnv1a64_known_vectors():
  # Published FNV-1a-64 test vectors.
  assert hashing.fnv1a64(b"") == 0xCBF29CE484222325
  assert hashing.fnv1a64(b"a") == 0xAF63DC4C8601EC8C
  assert hashing.fnv1a64(b"foobar") == 0x85944171F73967E8


def test_hash_kernel_matches_python_reference():
  values = [b"", b"68fd1e64", b"a", b"\xff\x00x", "caf\u00e9".encode()]
  buf = np.frombuffer(b"".join(values), np.uint8)
  ends = np.cumsum([len(v) for v in values]).astype(np.int64)
  starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
  got = hashing.hash_spans("C1", buf, starts, ends)
  expected = [hashing.splitmix64(hashing.fnv1a64(b"C1\x1f" + v)) for v in values]
  assert got.dtype == np.uint64
  assert [int(x) for x in got] == expected


def test_hash_ints_equals_decimal_text():
  values = np.array([0, 5, -7, 123456789012, np.iinfo(np.int64).min], np.int64)
  got = hashing.hash_ints("hour", values)
  expected = [hashing.feature_id("hour", str(int(v))) for v in values]
  assert [int(x) for x in got] == expected


def test_hash_multi_splits_tokens():
  text = b"1^22^333" + b"" + b"4"
  buf = np.frombuffer(text, np.uint8)
  starts = np.array([0, 8, 8], np.int64)
  ends = np.array([8, 8, 9], np.int64)
  ids, lengths = hashing.hash_multi("seq", buf, starts, ends, "^", empty_as_missing=True)
  assert lengths.tolist() == [3, 1, 1]
  expected = [hashing.feature_id("seq", t) for t in ["1", "22", "333", "", "4"]]
  assert [int(x) for x in ids] == expected
  _, lengths_no_missing = hashing.hash_multi("seq", buf, starts, ends, "^",
                                             empty_as_missing=False)
  assert lengths_no_missing.tolist() == [3, 0, 1]


def test_hash_same_value_differs_across_columns():
  ids = {hashing.feature_id(name, "25c83c98") for name in CRITEO_COLUMNS[14:]}
  assert len(ids) == 26
  assert hashing.feature_id("C1", "") != hashing.feature_id("C2", "")


# ----------------------------------------------------------------------------
# The committed slice.
# ----------------------------------------------------------------------------
def test_criteo_split_sizes():
  train, _ = read_all(criteo_config(shuffle=False), "train")
  test, _ = read_all(criteo_config(), "test")
  assert train.size == 6400
  assert test.size == 1600


def test_criteo_rows_match_raw_text():
  batch, _ = read_all(criteo_config(shuffle=False), "train")
  check_row(batch, 0, LINE_1)
  check_row(batch, 5, LINE_6)


def test_criteo_negative_and_missing_integers():
  batch, _ = read_all(criteo_config(shuffle=False), "train")
  # Line 6: I1 missing, I2 = -1, I5 = 12824.
  assert batch.dense[5, 0] == 0.0
  assert batch.dense[5, 1] == np.float32(-math.log(2.0))
  assert batch.dense[5, 4] == np.float32(math.log(12825.0))


def test_criteo_missing_category_hashes_empty_string():
  batch, _ = read_all(criteo_config(shuffle=False), "train")
  # C22 of line 1 is empty.
  assert int(batch.sparse["C22"].ids[0]) == hashing.feature_id("C22", "")


def test_criteo_test_split_starts_at_line_6401():
  batch, _ = read_all(criteo_config(), "test")
  check_row(batch, 0, LINE_6401)


def test_criteo_labels_match_file():
  train, _ = read_all(criteo_config(shuffle=False), "train")
  test, _ = read_all(criteo_config(), "test")
  with open(REPO_ROOT / "data/criteo/train_head8k.txt") as f:
    labels = [float(line.split("\t", 1)[0]) for line in f]
  np.testing.assert_array_equal(np.concatenate([train.labels, test.labels]), labels)


def test_criteo_sparse_inputs_are_one_hot():
  batch, _ = read_all(criteo_config(), "test")
  for name in CRITEO_COLUMNS[14:]:
    assert batch.sparse[name].lengths.tolist() == [1] * batch.size


def test_criteo_missing_indicator():
  batch, _ = read_all(criteo_config(shuffle=False, missing_indicator=True), "train")
  assert batch.dense.shape == (6400, 26)
  expected = [1.0 if t == "" else 0.0 for t in LINE_6[1:14]]
  assert batch.dense[5, 13:].tolist() == expected


def test_criteo_relative_path_from_other_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  batch, _ = read_all(criteo_config(), "test")
  assert batch.size == 1600


# ----------------------------------------------------------------------------
# Malformed input.
# ----------------------------------------------------------------------------
def _line(fields):
  return "\t".join(fields) + "\n"


def _write(tmp_path, lines, name="bad.txt"):
  path = tmp_path / name
  path.write_text("".join(lines))
  return str(path)


def _first_error(path, **overrides):
  config = criteo_config(files=path, test_fraction=0.0, shuffle=False, **overrides)
  with pytest.raises(DataError) as info:
    with build_input(config, split="train", batch_size=4) as iterator:
      list(iterator)
  return info.value


def test_criteo_wrong_field_count_error(tmp_path):
  path = _write(tmp_path, [_line(LINE_1), _line(LINE_1[:-1])])
  error = _first_error(path)
  message = str(error)
  assert path in message
  assert "line 2" in message
  assert "expected 40 fields, found 39" in message
  assert "on_bad_row=skip" in message


def test_criteo_text_in_integer_field_error(tmp_path):
  bad = list(LINE_1)
  bad[5] = "12x"
  path = _write(tmp_path, [_line(LINE_1), _line(LINE_1), _line(bad)])
  error = _first_error(path)
  message = str(error)
  assert path in message
  assert "line 3" in message
  assert "'I5'" in message
  assert "'12x'" in message
  assert "on_bad_row=skip" in message
  assert (error.line, error.column, error.value) == (3, "I5", "12x")


def test_criteo_label_outside_zero_one_error(tmp_path):
  bad = list(LINE_1)
  bad[0] = "2"
  path = _write(tmp_path, [_line(bad)])
  error = _first_error(path)
  assert (error.line, error.column, error.value) == (1, "label", "2")
  assert "label" in str(error)


def test_criteo_empty_line_error(tmp_path):
  path = _write(tmp_path, [_line(LINE_1), "\n", _line(LINE_1)])
  error = _first_error(path)
  assert error.line == 2
  assert error.reason == "empty_line"


def test_criteo_empty_file_error(tmp_path):
  path = _write(tmp_path, [])
  error = _first_error(path)
  assert "contains no data rows" in str(error)
  assert path in str(error)


def test_criteo_missing_file_error(tmp_path):
  config = criteo_config(files=str(tmp_path / "absent.txt"), test_fraction=0.0)
  with pytest.raises(FileNotFoundError, match="absent.txt"):
    build_input(config, split="train", batch_size=4)


def test_criteo_skip_counts_bad_rows(tmp_path):
  text_in_int = list(LINE_1)
  text_in_int[3] = "abc"
  bad_label = list(LINE_6)
  bad_label[0] = "-1"
  lines = [_line(LINE_1), _line(LINE_1[:20]), "\n", _line(text_in_int), _line(LINE_6),
           _line(bad_label), _line(text_in_int)]
  path = _write(tmp_path, lines)
  config = criteo_config(files=path, test_fraction=0.0, shuffle=False, on_bad_row="skip")
  with build_input(config, split="train", batch_size=100) as iterator:
    batches = list(iterator)
    report = iterator.report
  assert [b.size for b in batches] == [2]
  check_row(batches[0], 0, LINE_1)
  check_row(batches[0], 1, LINE_6)
  assert report["rows_read"] == 7
  assert report["rows_skipped"] == {"wrong_field_count": 1, "empty_line": 1,
                                    "invalid_number": 2, "invalid_label": 1}


def test_criteo_crlf_line_endings(tmp_path):
  path = _write(tmp_path, ["\t".join(LINE_1) + "\r\n", "\t".join(LINE_6) + "\r\n"])
  config = criteo_config(files=path, test_fraction=0.0, shuffle=False)
  batch, _ = read_all(config, "train")
  check_row(batch, 0, LINE_1)
  check_row(batch, 1, LINE_6)


def test_criteo_error_reaches_consumer_and_threads_stop(tmp_path):
  bad = list(LINE_1)
  bad[2] = "oops"
  path = _write(tmp_path, [_line(LINE_1)] * 50 + [_line(bad)])
  before = set(threading.enumerate())
  config = criteo_config(files=path, test_fraction=0.0, shuffle=False)
  iterator = build_input(config, split="train", batch_size=4)
  with pytest.raises(DataError, match="line 51"):
    list(iterator)
  iterator.close()
  assert set(threading.enumerate()) - before == set()
