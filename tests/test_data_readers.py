"""Tests of the Avazu, Taobao, Adult (Parquet), libsvm and generic CSV readers."""

import datetime
import math
import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from persia_jax.data import (DataError, adult_config, avazu_config, build_input,
                             criteo_config, libsvm_config, taobao_config)
from persia_jax.data import hashing, parsing
from persia_jax.data.configs import AVAZU_CATEGORICAL_COLUMNS

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# Line 2 (first data row) of data/avazu/train_head8k.csv, split at commas by hand.
AVAZU_HEADER = ("id,click,hour,C1,banner_pos,site_id,site_domain,site_category,app_id,"
                "app_domain,app_category,device_id,device_ip,device_model,device_type,"
                "device_conn_type,C14,C15,C16,C17,C18,C19,C20,C21")
AVAZU_ROW_1 = ["1000009418151094273", "0", "14102100", "1005", "0", "1fbe01fe", "f3845767",
               "28905ebd", "ecad2386", "7801e8d9", "07d7df22", "a99f214a", "ddd2926e",
               "44956a24", "1", "2", "15706", "320", "50", "1722", "0", "35", "-1", "79"]


def first_batch(config, split="train", batch_size=100_000):
  with build_input(config, split=split, batch_size=batch_size) as iterator:
    batches = list(iterator)
  assert len(batches) == 1
  return batches[0]


def ids_of(batch, name):
  return [int(x) for x in batch.sparse[name].ids]


# ----------------------------------------------------------------------------
# Avazu.
# ----------------------------------------------------------------------------
def test_avazu_split_sizes():
  assert first_batch(avazu_config(shuffle=False)).size == 6400
  assert first_batch(avazu_config(), "test").size == 1600


def test_avazu_first_row_matches_raw_text():
  batch = first_batch(avazu_config(shuffle=False))
  assert batch.labels[0] == 0.0
  assert batch.dense.shape == (6400, 0)
  columns = AVAZU_HEADER.split(",")
  for name in AVAZU_CATEGORICAL_COLUMNS:
    value = AVAZU_ROW_1[columns.index(name)]
    assert ids_of(batch, name)[0] == hashing.feature_id(name, value), name


def test_avazu_hour_features():
  batch = first_batch(avazu_config(shuffle=False))
  # 14102100 is 2014-10-21, hour 00; that day was a Tuesday (1 with Monday = 0).
  assert ids_of(batch, "hour_of_day")[0] == hashing.feature_id("hour_of_day", "0")
  assert ids_of(batch, "day_of_week")[0] == hashing.feature_id("day_of_week", "1")


@pytest.mark.parametrize("text", ["14102100", "16022923", "00010107", "20123115"])
def test_hour_kernel_matches_datetime(text):
  buf = np.frombuffer(text.encode(), np.uint8)
  values, status = parsing.parse_ints(buf, np.array([0], np.int64),
                                      np.array([len(text)], np.int64))
  hours, weekdays = parsing._hour_features_kernel(values, status)  # pylint: disable=protected-access
  day = datetime.date(2000 + int(text[:2]), int(text[2:4]), int(text[4:6]))
  assert status[0] == 0
  assert hours[0] == int(text[6:])
  assert weekdays[0] == day.weekday()


def test_avazu_invalid_hour_error(tmp_path):
  bad = list(AVAZU_ROW_1)
  bad[2] = "14109925"
  path = tmp_path / "avazu.csv"
  path.write_text(AVAZU_HEADER + "\n" + ",".join(AVAZU_ROW_1) + "\n" + ",".join(bad) + "\n")
  config = avazu_config(files=str(path), test_fraction=0.0)
  with pytest.raises(DataError) as info:
    first_batch(config)
  assert (info.value.line, info.value.column, info.value.value) == (3, "hour", "14109925")


def test_avazu_header_mismatch_error(tmp_path):
  path = tmp_path / "avazu.csv"
  path.write_text(AVAZU_HEADER.replace("site_id", "site") + "\n" + ",".join(AVAZU_ROW_1) + "\n")
  config = avazu_config(files=str(path), test_fraction=0.0)
  with pytest.raises(DataError) as info:
    build_input(config, split="train", batch_size=4)
  message = str(info.value)
  assert str(path) in message
  assert "line 1" in message
  assert "site_id" in message


def test_header_only_file_is_empty(tmp_path):
  path = tmp_path / "avazu.csv"
  path.write_text(AVAZU_HEADER + "\n")
  config = avazu_config(files=str(path), test_fraction=0.0)
  with pytest.raises(DataError, match="contains no data rows"):
    first_batch(config)


def test_empty_file_skipped_and_counted(tmp_path):
  (tmp_path / "a.csv").write_text(AVAZU_HEADER + "\n" + ",".join(AVAZU_ROW_1) + "\n")
  (tmp_path / "b.csv").write_text("")
  config = avazu_config(files=str(tmp_path / "*.csv"), test_fraction=0.0, on_bad_row="skip")
  with build_input(config, split="train", batch_size=10) as iterator:
    sizes = [b.size for b in iterator]
    report = iterator.report
  assert sizes == [1]
  assert report["rows_skipped"] == {"empty_file": 1}


# ----------------------------------------------------------------------------
# Taobao.
# ----------------------------------------------------------------------------
def test_taobao_first_row_matches_raw_text():
  # Line 2 of data/taobao/tiny_train.csv:
  # 0,2017-05-06 00:00:00,874257,172298,430548_1007,5443,160194,864,339907,3.9,0,3,2,3,,3,0,,170301^573514
  batch = first_batch(taobao_config(shuffle=False))
  assert batch.size == 100
  assert batch.labels[0] == 0.0
  assert batch.dense[0, 0] == np.float32(math.log(4.9))
  assert ids_of(batch, "userid")[0] == hashing.feature_id("userid", "874257")
  assert ids_of(batch, "pid")[0] == hashing.feature_id("pid", "430548_1007")
  assert ids_of(batch, "pvalue_level")[0] == hashing.feature_id("pvalue_level", "")
  sequence = batch.sparse["click_sequence"]
  assert sequence.lengths[0] == 2
  assert ids_of(batch, "click_sequence")[:2] == [
      hashing.feature_id("click_sequence", "170301"),
      hashing.feature_id("click_sequence", "573514")]


def test_taobao_multi_value_lengths_match_file():
  batch = first_batch(taobao_config(), "test")
  with open(REPO_ROOT / "data/taobao/tiny_test.csv") as f:
    rows = [line.rstrip("\n").split(",") for line in f][1:]
  expected = [len(r[-1].split("^")) if r[-1] else 1 for r in rows]
  assert batch.sparse["click_sequence"].lengths.tolist() == expected
  assert batch.labels.tolist() == [float(r[0]) for r in rows]


# ----------------------------------------------------------------------------
# Adult (Parquet).
# ----------------------------------------------------------------------------
def test_adult_rows_match_parquet():
  batch = first_batch(adult_config(shuffle=False))
  assert batch.size == 39074  # round(48842 * 0.8)
  # Row 0: age 25, fnlwgt 226802, educational-num 7, capital gain/loss 0, 40 hours, <=50K.
  expected = np.log1p(np.array([25, 226802, 7, 0, 0, 40], np.float64)).astype(np.float32)
  np.testing.assert_allclose(batch.dense[0], expected, rtol=1e-6)
  assert batch.labels[0] == 0.0
  assert ids_of(batch, "workclass")[0] == hashing.feature_id("workclass", "Private")
  assert ids_of(batch, "race")[0] == hashing.feature_id("race", "Black")
  # Row 2 has income ">50K".
  assert batch.labels[2] == 1.0


def test_adult_positive_count():
  train = first_batch(adult_config())
  test = first_batch(adult_config(), "test")
  assert train.labels.sum() + test.labels.sum() == 11687


def test_parquet_missing_column_error(tmp_path):
  path = tmp_path / "small.parquet"
  pq.write_table(pa.table({"age": [1, 2], "income": [">50K", "<=50K"]}), path)
  config = adult_config(files=str(path), test_fraction=0.0)
  with pytest.raises(DataError, match="workclass"):
    first_batch(config)


def test_parquet_invalid_label_error_and_skip(tmp_path):
  table = pa.table({
      "age": [30, 40, 50], "workclass": ["a", None, "c"], "income": ["<=50K", "maybe", ">50K"]})
  path = tmp_path / "small.parquet"
  pq.write_table(table, path)
  features = [dict(name="age", kind="dense", column="age"),
              dict(name="workclass", kind="categorical", column="workclass")]
  config = adult_config(files=str(path), test_fraction=0.0, shuffle=False, features=features)
  with pytest.raises(DataError) as info:
    first_batch(config)
  assert (info.value.line, info.value.column, info.value.value) == (2, "income", "maybe")
  assert "row 2" in str(info.value)
  config.on_bad_row = "skip"
  with build_input(config, split="train", batch_size=10) as iterator:
    batch = next(iterator)
    report = iterator.report
  assert batch.labels.tolist() == [0.0, 1.0]
  assert report["rows_skipped"] == {"invalid_label": 1}


def test_parquet_null_category_is_missing(tmp_path):
  path = tmp_path / "small.parquet"
  pq.write_table(pa.table({"age": [30, None], "workclass": [None, "x"],
                           "income": ["<=50K", ">50K"]}), path)
  features = [dict(name="age", kind="dense", column="age"),
              dict(name="workclass", kind="categorical", column="workclass")]
  config = adult_config(files=str(path), test_fraction=0.0, shuffle=False, features=features)
  batch = first_batch(config)
  assert ids_of(batch, "workclass") == [hashing.feature_id("workclass", ""),
                                        hashing.feature_id("workclass", "x")]
  assert batch.dense[:, 0].tolist() == [np.float32(math.log(31.0)), 0.0]


# ----------------------------------------------------------------------------
# Generic CSV.
# ----------------------------------------------------------------------------
def test_generic_csv_columns_from_header(tmp_path):
  path = tmp_path / "data.csv"
  path.write_text("y,price,tags,city\n1,2.5,a|b|c,Paris\n0,-1e1,,Rome\n")
  features = [dict(name="price", kind="dense", column="price", transform="identity"),
              dict(name="tags", kind="multi_value", column="tags", delimiter="|",
                   empty_as_missing=False),
              dict(name="city", kind="categorical", column="city")]
  config = criteo_config(files=str(path), delimiter=",", header=True, columns=None,
                         test_fraction=0.0, shuffle=False, features=features)
  config.label.column = "y"
  batch = first_batch(config)
  assert batch.labels.tolist() == [1.0, 0.0]
  assert batch.dense[:, 0].tolist() == [2.5, -10.0]
  assert batch.sparse["tags"].lengths.tolist() == [3, 0]
  assert ids_of(batch, "tags") == [hashing.feature_id("tags", t) for t in "abc"]
  assert ids_of(batch, "city") == [hashing.feature_id("city", "Paris"),
                                   hashing.feature_id("city", "Rome")]


def test_generic_csv_schema_column_not_in_header(tmp_path):
  path = tmp_path / "data.csv"
  path.write_text("y,price\n1,2.5\n")
  config = criteo_config(files=str(path), delimiter=",", header=True, columns=None,
                         test_fraction=0.0,
                         features=[dict(name="cost", kind="dense", column="cost")])
  config.label.column = "y"
  with pytest.raises(DataError, match="cost"):
    build_input(config, split="train", batch_size=4)


@pytest.mark.parametrize("text", ["0", "-12.5", "3e2", "1.25E-3", "  7 ", "+4.", ".5",
                                  "123456789012345678901"])
def test_float_parser_matches_python(text):
  buf = np.frombuffer(text.encode(), np.uint8)
  values, status = parsing.parse_floats(buf, np.array([0], np.int64),
                                        np.array([len(text)], np.int64))
  assert status[0] == 0
  assert values[0] == pytest.approx(float(text), rel=1e-15)


@pytest.mark.parametrize("text", ["abc", "1.2.3", "1e", "-", "1,5", "nan"])
def test_float_parser_rejects_text(text):
  buf = np.frombuffer(text.encode(), np.uint8)
  _, status = parsing.parse_floats(buf, np.array([0], np.int64),
                                   np.array([len(text)], np.int64))
  assert status[0] == 2


# ----------------------------------------------------------------------------
# libsvm / libFM.
# ----------------------------------------------------------------------------
def test_libsvm_lines(tmp_path):
  path = tmp_path / "data.svm"
  path.write_text("1 3:1 7:0.5 2:0\n-1 1:1\n0 9:2.5\n")
  batch = first_batch(libsvm_config(files=str(path), shuffle=False))
  assert batch.labels.tolist() == [1.0, 0.0, 0.0]
  # Index 2 has value 0 and is dropped.
  assert batch.sparse["field_0"].lengths.tolist() == [2, 1, 1]
  assert ids_of(batch, "field_0") == [hashing.feature_id("field_0", t)
                                      for t in ["3", "7", "1", "9"]]


def test_libfm_fields_and_dense_index(tmp_path):
  path = tmp_path / "data.ffm"
  path.write_text("1 0:3:1 1:7:1 2:5:4.5\n0 1:2:1\n")
  features = [dict(name="f0", kind="multi_value", column="0", delimiter=" "),
              dict(name="f1", kind="multi_value", column="1", delimiter=" "),
              dict(name="price", kind="dense", column="2:5", transform="identity")]
  config = libsvm_config(files=str(path), shuffle=False, num_fields=3, features=features)
  batch = first_batch(config)
  assert batch.dense[:, 0].tolist() == [4.5, 0.0]
  assert ids_of(batch, "f0") == [hashing.feature_id("f0", "3"), hashing.feature_id("f0", "")]
  assert ids_of(batch, "f1") == [hashing.feature_id("f1", "7"), hashing.feature_id("f1", "2")]


@pytest.mark.parametrize("line,column,value,reason", [
    ("2 1:1", "label", "2", "invalid_label"),
    ("1 1:x", "token 1", "1:x", "invalid_number"),
    ("1 1:1 oops", "token 2", "oops", "invalid_number"),
    ("1 5:1:1", "token 1", "5:1:1", "invalid_number"),  # Field 5 >= num_fields.
])
def test_libsvm_bad_lines(tmp_path, line, column, value, reason):
  path = tmp_path / "data.svm"
  path.write_text("1 1:1\n" + line + "\n")
  with pytest.raises(DataError) as info:
    first_batch(libsvm_config(files=str(path)))
  error = info.value
  assert (error.line, error.column, error.value, error.reason) == (2, column, value, reason)
  assert str(path) in str(error)


def test_libsvm_skip_counts(tmp_path):
  path = tmp_path / "data.svm"
  path.write_text("1 1:1\n\n2 1:1\n0 1:x\n0 4:1\n")
  config = libsvm_config(files=str(path), shuffle=False, on_bad_row="skip")
  with build_input(config, split="train", batch_size=10) as iterator:
    batch = next(iterator)
    report = iterator.report
  assert batch.labels.tolist() == [1.0, 0.0]
  assert report["rows_skipped"] == {"empty_line": 1, "invalid_label": 1, "invalid_number": 1}


def test_empty_file_in_fraction_split(tmp_path):
  (tmp_path / "a.csv").write_text(AVAZU_HEADER + "\n" + (",".join(AVAZU_ROW_1) + "\n") * 10)
  (tmp_path / "b.csv").write_text(AVAZU_HEADER + "\n")
  config = avazu_config(files=str(tmp_path / "*.csv"), test_fraction=0.2)
  with pytest.raises(DataError, match="b.csv"):
    build_input(config, split="train", batch_size=4)
  config.on_bad_row = "skip"
  with build_input(config, split="train", batch_size=100) as iterator:
    sizes = [b.size for b in iterator]
    report = iterator.report
  assert sizes == [8]
  assert report["rows_skipped"] == {"empty_file": 1}
