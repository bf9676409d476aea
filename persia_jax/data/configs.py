"""Default data configs for the committed data slices and the synthetic source.

Every function returns an `ml_collections.ConfigDict` that `build_input`
accepts; keyword overrides replace top-level fields, for example
`criteo_config(files="/data/criteo/day_*.gz", test_fraction=0.0)`.

Fields shared by all formats:
  format: "csv" (any delimited text, Criteo included), "parquet", "libsvm"
    or "synthetic".
  files: a path, glob or list of them; relative paths resolve against the
    current directory, then the repository root.
  test_files: files of the "test" split; if empty, the split is taken by
    `test_fraction`.
  test_fraction: with no test_files, the first (1 - test_fraction) of the
    rows (files in sorted order, then file order) are "train" and the rest
    "test". Needs one counting pass over the files; set 0.0 and test_files
    for very large data.
  label, features, missing_indicator: the feature schema (see `schema`).
  num_epochs: training epochs, None for no end.
  shuffle, shuffle_buffer: train-split shuffling, in rows per window.
  block_size: bytes per read (text) or rows per block (Parquet, synthetic).
  prefetch: batches prepared ahead; num_parse_threads: parser threads.
  on_bad_row: "error" (raise on the first bad row) or "skip" (skip and count).
  drop_remainder: drop a last batch with fewer than batch_size rows.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from persia_jax.data.schema import feature_entries

CRITEO_INTEGER_COLUMNS = [f"I{i}" for i in range(1, 14)]
CRITEO_CATEGORICAL_COLUMNS = [f"C{i}" for i in range(1, 27)]
CRITEO_COLUMNS = ["label", *CRITEO_INTEGER_COLUMNS, *CRITEO_CATEGORICAL_COLUMNS]

AVAZU_CATEGORICAL_COLUMNS = [
    "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id",
    "app_domain", "app_category", "device_id", "device_ip", "device_model",
    "device_type", "device_conn_type", "C14", "C15", "C16", "C17", "C18", "C19",
    "C20", "C21"]

TAOBAO_CATEGORICAL_COLUMNS = [
    "userid", "adgroup_id", "pid", "cate_id", "campaign_id", "customer", "brand",
    "cms_segid", "cms_group_id", "final_gender_code", "age_level", "pvalue_level",
    "shopping_level", "occupation", "new_user_class_level"]

ADULT_DENSE_COLUMNS = ["age", "fnlwgt", "educational-num", "capital-gain",
                       "capital-loss", "hours-per-week"]
ADULT_CATEGORICAL_COLUMNS = ["workclass", "education", "marital-status", "occupation",
                             "relationship", "race", "gender", "native-country"]


def _common(**fields: Any) -> ml_collections.ConfigDict:
  values = dict(
      format="csv", files="", test_files="", test_fraction=0.2, columns=None,
      delimiter=",", header=True,
      label=dict(column="label", positive_values=[], negative_values=[]),
      features=[], missing_indicator=False, num_epochs=1, shuffle=True,
      shuffle_buffer=65536, block_size=1 << 20, prefetch=4, num_parse_threads=2,
      on_bad_row="error", drop_remainder=False)
  values.update(fields)
  return ml_collections.ConfigDict(values)


def _override(config: ml_collections.ConfigDict, overrides: dict[str, Any]
              ) -> ml_collections.ConfigDict:
  for key, value in overrides.items():
    if key not in config:
      raise KeyError(f"Unknown data config field {key!r}; known fields: {sorted(config.keys())}.")
    if isinstance(value, dict) and isinstance(config[key], ml_collections.ConfigDict):
      config[key].update(value)
    else:
      with config.ignore_type():
        config[key] = value
  return config


def criteo_config(**overrides: Any) -> ml_collections.ConfigDict:
  """Criteo Kaggle `train.txt`: label, I1-I13 (signed log), C1-C26 (hashed); 80/20 split.

  Defaults read the committed 8,000-row slice (6,400 train / 1,600 test rows).
  """
  config = _common(
      files="data/criteo/train_head8k.txt", delimiter="\t", header=False,
      columns=list(CRITEO_COLUMNS),
      features=feature_entries(dense=CRITEO_INTEGER_COLUMNS,
                               categorical=CRITEO_CATEGORICAL_COLUMNS))
  return _override(config, overrides)


def avazu_config(**overrides: Any) -> ml_collections.ConfigDict:
  """Avazu Kaggle `train.csv`: click label, hour-of-day and day-of-week, 21 categorical columns."""
  features = [
      dict(name="hour_of_day", kind="categorical", column="hour", transform="hour_of_day",
           table="hour_of_day", pooling="none"),
      dict(name="day_of_week", kind="categorical", column="hour", transform="day_of_week",
           table="day_of_week", pooling="none"),
      *feature_entries(categorical=AVAZU_CATEGORICAL_COLUMNS),
  ]
  config = _common(files="data/avazu/train_head8k.csv", header=True, features=features)
  config.label.column = "click"
  return _override(config, overrides)


def taobao_config(**overrides: Any) -> ml_collections.ConfigDict:
  """Taobao display-ad clicks joined with user and ad profiles; `click_sequence` is multi-value."""
  config = _common(
      files="data/taobao/tiny_train.csv", test_files="data/taobao/tiny_test.csv",
      test_fraction=0.0, header=True,
      features=feature_entries(dense=["price"], categorical=TAOBAO_CATEGORICAL_COLUMNS,
                               multi_value=[("click_sequence", "^")]))
  config.label.column = "clk"
  return _override(config, overrides)


def adult_config(**overrides: Any) -> ml_collections.ConfigDict:
  """UCI Adult (census income) from Parquet; label 1 for income ">50K"."""
  config = _common(
      format="parquet", files="data/adult/adult.parquet.brotli", header=False,
      block_size=8192,
      features=feature_entries(dense=ADULT_DENSE_COLUMNS, categorical=ADULT_CATEGORICAL_COLUMNS))
  config.label = ml_collections.ConfigDict(dict(
      column="income", positive_values=[">50K", ">50K."],
      negative_values=["<=50K", "<=50K."]))
  return _override(config, overrides)


def libsvm_config(**overrides: Any) -> ml_collections.ConfigDict:
  """libsvm (`label idx:value ...`) or libFM (`label field:idx:value ...`) text.

  Each field f becomes a multi-value feature `field_<f>` with column "<f>"
  (plain libsvm lines are field 0). A token's ID is the hash of its index
  text; its value only decides presence (0 drops the token). Features of
  kind "dense" with column "<field>:<idx>" (or "<idx>") take the token's
  value instead. Labels "-1" map to 0 when `libsvm_minus_one_is_negative`.
  """
  config = _common(
      format="libsvm", header=False, test_fraction=0.0, block_size=1 << 20,
      num_fields=1, libsvm_minus_one_is_negative=True,
      features=[dict(name="field_0", kind="multi_value", column="0", delimiter=" ",
                     table="field_0", pooling="sum")])
  return _override(config, overrides)


def synthetic_config(**overrides: Any) -> ml_collections.ConfigDict:
  """Synthetic clicks from a hidden model with a known AUC ceiling (see `synthetic`)."""
  config = _common(format="synthetic", header=False, test_fraction=0.0, block_size=16384)
  config.synthetic = ml_collections.ConfigDict(dict(
      data_seed=0,
      num_samples=1_000_000,
      num_test_samples=100_000,
      num_dense=13,
      num_categorical=26,
      vocab_size=1_000_000,
      zipf_exponent=1.05,
      num_multi_value=0,
      multi_value_vocab_size=100_000,
      max_length=8,
      latent_dim=8,
      interaction_scale=1.0,
      bias_scale=0.8,
      dense_scale=0.5,
      label_bias=-1.5,
      ceiling_samples=200_000,
      dense_names=[],
      categorical_names=[],
  ))
  return _override(config, overrides)
