"""Vectorized parsing of delimited text and string columns into `Chunk`s.

Text blocks are split into lines and fields by a numba tokenizer that returns
byte spans, so no Python object is made per field. Each schema column is then
parsed from its spans in one kernel call: numbers by a decimal parser,
categorical values by the hash in `hashing`. Validation is vectorized too: a
row-level reason code is computed for every row, and only when a row is bad
is its text decoded for the error message.

Quoted fields are not supported; a delimiter inside quotes splits the field.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numba
import numpy as np

from persia_jax.data import hashing
from persia_jax.data.chunk import Chunk
from persia_jax.data.schema import Schema

# Bad-row reasons, as stored per row and reported by `BatchIterator.report`.
OK = 0
FIELD_COUNT = 1
EMPTY_LINE = 2
INVALID_NUMBER = 3
INVALID_LABEL = 4
INVALID_VALUE = 5
REASONS = {
    FIELD_COUNT: "wrong_field_count",
    EMPTY_LINE: "empty_line",
    INVALID_NUMBER: "invalid_number",
    INVALID_LABEL: "invalid_label",
    INVALID_VALUE: "invalid_value",
}
SKIP_HINT = ("Fix the input, or set on_bad_row='skip' in the data config (for"
             " example --config.data.on_bad_row=skip) to skip such rows; skipped"
             " rows are counted by reason in the iterator's report.")

# Status codes of the number parsers.
_STATUS_OK = 0
_STATUS_MISSING = 1
_STATUS_INVALID = 2


class DataError(ValueError):
  """Invalid input data, with the file, line (or row), column and value."""

  def __init__(self, message: str, *, path: str = "", line: int = 0,
               column: str = "", value: str = "", reason: str = ""):
    super().__init__(message)
    self.path = path
    self.line = line
    self.column = column
    self.value = value
    self.reason = reason


# ----------------------------------------------------------------------------
# Kernels.
# ----------------------------------------------------------------------------
@numba.njit(nogil=True, cache=True)
def _tokenize_kernel(buf, delimiter, num_fields):
  size = buf.shape[0]
  num_lines = 0
  for k in range(size):
    if buf[k] == 10:
      num_lines += 1
  if size > 0 and buf[size - 1] != 10:
    num_lines += 1
  line_starts = np.empty(num_lines, np.int64)
  line_ends = np.empty(num_lines, np.int64)
  field_starts = np.zeros((num_lines, num_fields), np.int64)
  field_ends = np.zeros((num_lines, num_fields), np.int64)
  field_counts = np.zeros(num_lines, np.int32)
  start = 0
  for i in range(num_lines):
    end = start
    while end < size and buf[end] != 10:
      end += 1
    next_start = end + 1
    if end > start and buf[end - 1] == 13:  # Windows line ending.
      end -= 1
    line_starts[i] = start
    line_ends[i] = end
    if end > start:
      count = 0
      field_start = start
      for k in range(start, end + 1):
        if k == end or buf[k] == delimiter:
          if count < num_fields:
            field_starts[i, count] = field_start
            field_ends[i, count] = k
          count += 1
          field_start = k + 1
      field_counts[i] = count
    start = next_start
  return line_starts, line_ends, field_starts, field_ends, field_counts


@numba.njit(nogil=True, cache=True)
def parse_float_span(buf, start, end):
  """Parses buf[start:end] as a decimal number; returns (value, status)."""
  k = start
  while k < end and buf[k] == 32:
    k += 1
  while end > k and buf[end - 1] == 32:
    end -= 1
  if k == end:
    return 0.0, _STATUS_MISSING

  negative = False
  if buf[k] == 45 or buf[k] == 43:
    negative = buf[k] == 45
    k += 1

  # Up to 18 significant digits go into an integer mantissa; later digits
  # only shift the decimal exponent.
  mantissa = 0
  mantissa_digits = 0
  exponent = 0
  num_digits = 0
  while k < end and 48 <= buf[k] <= 57:
    if mantissa_digits < 18:
      mantissa = mantissa * 10 + (buf[k] - 48)
      if mantissa > 0:
        mantissa_digits += 1
    else:
      exponent += 1
    num_digits += 1
    k += 1
  if k < end and buf[k] == 46:
    k += 1
    while k < end and 48 <= buf[k] <= 57:
      if mantissa_digits < 18:
        mantissa = mantissa * 10 + (buf[k] - 48)
        if mantissa > 0:
          mantissa_digits += 1
        exponent -= 1
      num_digits += 1
      k += 1
  if num_digits == 0:
    return 0.0, _STATUS_INVALID

  if k < end and (buf[k] == 101 or buf[k] == 69):
    k += 1
    exp_negative = False
    if k < end and (buf[k] == 45 or buf[k] == 43):
      exp_negative = buf[k] == 45
      k += 1
    exp_value = 0
    exp_digits = 0
    while k < end and 48 <= buf[k] <= 57:
      if exp_value < 100000:
        exp_value = exp_value * 10 + (buf[k] - 48)
      exp_digits += 1
      k += 1
    if exp_digits == 0:
      return 0.0, _STATUS_INVALID
    exponent += -exp_value if exp_negative else exp_value
  if k != end:
    return 0.0, _STATUS_INVALID

  value = float(mantissa)
  if exponent > 0:
    value *= 10.0 ** exponent
  elif exponent < 0:
    # Dividing by an exact power of ten rounds once, unlike multiplying by
    # the inexact 10**-e.
    if exponent >= -22:
      value /= 10.0 ** (-exponent)
    else:
      value = value / 1e22 / 10.0 ** (-exponent - 22)
  return (-value if negative else value), _STATUS_OK


@numba.njit(nogil=True, cache=True)
def parse_int_span(buf, start, end):
  """Parses buf[start:end] as a signed integer of at most 18 digits; returns (value, status)."""
  k = start
  if k == end:
    return 0, _STATUS_MISSING
  negative = False
  if buf[k] == 45 or buf[k] == 43:
    negative = buf[k] == 45
    k += 1
  if k == end or end - k > 18:
    return 0, _STATUS_INVALID
  value = 0
  for j in range(k, end):
    digit = buf[j] - 48
    if digit < 0 or digit > 9:
      return 0, _STATUS_INVALID
    value = value * 10 + digit
  return (-value if negative else value), _STATUS_OK


@numba.njit(nogil=True, cache=True)
def _parse_floats_kernel(buf, starts, ends):
  n = starts.shape[0]
  values = np.zeros(n, np.float64)
  status = np.zeros(n, np.int8)
  for i in range(n):
    values[i], status[i] = parse_float_span(buf, starts[i], ends[i])
  return values, status


@numba.njit(nogil=True, cache=True)
def _parse_ints_kernel(buf, starts, ends):
  n = starts.shape[0]
  values = np.zeros(n, np.int64)
  status = np.zeros(n, np.int8)
  for i in range(n):
    values[i], status[i] = parse_int_span(buf, starts[i], ends[i])
  return values, status


@numba.njit(nogil=True, cache=True)
def _hour_features_kernel(values, status):
  """Maps YYMMDDHH integers to (hour of day, day of week with Monday = 0)."""
  n = values.shape[0]
  hours = np.zeros(n, np.int64)
  weekdays = np.zeros(n, np.int64)
  for i in range(n):
    v = values[i]
    hour = v % 100
    day = (v // 100) % 100
    month = (v // 10000) % 100
    year = 2000 + v // 1000000
    if status[i] != 0 or v < 0 or hour > 23 or day < 1 or day > 31 or month < 1 or month > 12:
      status[i] = 2
      continue
    # Days since 1970-01-01 by the civil-calendar formula (March-based years).
    y = year - 1 if month <= 2 else year
    era = y // 400
    year_of_era = y - era * 400
    m = month + 9 if month <= 2 else month - 3
    day_of_year = (153 * m + 2) // 5 + day - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    days = era * 146097 + day_of_era - 719468
    hours[i] = hour
    weekdays[i] = (days + 3) % 7  # 1970-01-01 was a Thursday (3 when Monday is 0).
  return hours, weekdays


def signed_log1p(x: np.ndarray) -> np.ndarray:
  """x > 0 -> log(1 + x); x <= 0 -> -log(1 - x)."""
  return np.sign(x) * np.log1p(np.abs(x))


def parse_floats(buf, starts, ends) -> tuple[np.ndarray, np.ndarray]:
  """Parses decimal numbers; returns (float64 [n], status int8 [n]: 0 ok, 1 empty, 2 invalid)."""
  return _parse_floats_kernel(buf, starts, ends)


def parse_ints(buf, starts, ends) -> tuple[np.ndarray, np.ndarray]:
  """Parses signed integers; returns (int64 [n], status int8 [n]: 0 ok, 1 empty, 2 invalid)."""
  return _parse_ints_kernel(buf, starts, ends)


@dataclasses.dataclass
class Lines:
  """Fields of a text block, as byte spans into `buf`.

  Attributes:
    buf: uint8 [num_bytes] block text, whole lines only.
    line_starts, line_ends: int64 [n] span of each line without its newline.
    field_starts, field_ends: int64 [n, num_fields] span of each field.
    field_counts: int32 [n] fields found on each line (0 for an empty line).
  """

  buf: np.ndarray
  line_starts: np.ndarray
  line_ends: np.ndarray
  field_starts: np.ndarray
  field_ends: np.ndarray
  field_counts: np.ndarray

  @property
  def size(self) -> int:
    return int(self.line_starts.shape[0])

  def line_text(self, i: int) -> str:
    return bytes(self.buf[self.line_starts[i]:self.line_ends[i]]).decode("utf-8", "replace")


def tokenize(buf: np.ndarray, delimiter: str, num_fields: int) -> Lines:
  """Splits a block of whole lines into fields separated by `delimiter`."""
  return Lines(buf, *_tokenize_kernel(buf, np.uint8(ord(delimiter)), num_fields))


# ----------------------------------------------------------------------------
# Rows to a Chunk.
# ----------------------------------------------------------------------------
Spans = tuple[np.ndarray, np.ndarray, np.ndarray]  # (buf, starts, ends)


@dataclasses.dataclass
class ParsedRows:
  """Result of `parse_rows`.

  Attributes:
    chunk: the good rows.
    keep: bool [n], which input rows are in `chunk`.
    skipped: reason name to the number of rows skipped for it.
  """

  chunk: Chunk
  keep: np.ndarray
  skipped: dict[str, int]


def _truncate(text: str, limit: int = 200) -> str:
  return text if len(text) <= limit else text[:limit] + "..."


def parse_rows(schema: Schema, spans: dict[str, Spans], num_rows: int, *,
               row_reasons: np.ndarray | None, path: str,
               line_numbers: np.ndarray, on_bad_row: str,
               describe_row: Callable[[int], str] | None = None,
               location: str = "line") -> ParsedRows:
  """Parses and validates rows given the byte spans of each source column.

  Args:
    schema: features to produce.
    spans: source column name to (buf uint8, starts int64 [n], ends int64 [n]).
    num_rows: n.
    row_reasons: int8 [n] reasons found before column parsing (field count,
      empty line), or None.
    path: file name for error messages.
    line_numbers: int64 [n] 1-based line (or row) number of each row.
    on_bad_row: "error" raises `DataError` on the first bad row; "skip" drops
      bad rows and counts them.
    describe_row: returns the text of row i, for row-level errors.
    location: "line" for text files, "row" for Parquet.

  Returns:
    The parsed good rows.

  Raises:
    DataError: on the first bad row when on_bad_row is "error".
  """
  reasons = (np.zeros(num_rows, np.int8) if row_reasons is None
             else row_reasons.astype(np.int8, copy=True))
  bad_column = np.full(num_rows, -1, np.int32)
  columns = schema.source_columns()
  detail = {}

  def mark(mask: np.ndarray, reason: int, column: str) -> None:
    new = mask & (reasons == OK)
    if new.any():
      reasons[new] = reason
      bad_column[new] = columns.index(column)

  # Label.
  label = schema.label
  if not label.column:
    # Unlabelled data, for example rows to score: every label reads as 0.
    labels = np.zeros(num_rows, np.float32)
  elif label.positive_values:
    buf, starts, ends = spans[label.column]
    ids = hashing.hash_spans(label.column, buf, starts, ends)
    positive = np.isin(ids, [hashing.feature_id(label.column, v) for v in label.positive_values])
    negative = np.isin(ids, [hashing.feature_id(label.column, v) for v in label.negative_values])
    mark(~(positive | negative), INVALID_LABEL, label.column)
    labels = positive.astype(np.float32)
    detail[INVALID_LABEL] = (f"expected one of {list(label.positive_values)} (label 1) or"
                             f" {list(label.negative_values)} (label 0)")
  else:
    values, status = parse_floats(*spans[label.column])
    mark((status != 0) | ((values != 0.0) & (values != 1.0)), INVALID_LABEL, label.column)
    labels = values.astype(np.float32)
    detail[INVALID_LABEL] = "a label must be 0 or 1"

  # Dense features.
  dense = np.zeros((num_rows, schema.num_dense), np.float32)
  num_base = len(schema.dense)
  for j, feature in enumerate(schema.dense):
    values, status = parse_floats(*spans[feature.column])
    mark(status == _STATUS_INVALID, INVALID_NUMBER, feature.column)
    missing = status != _STATUS_OK
    values[missing] = 0.0
    if feature.transform == "signed_log1p":
      values = signed_log1p(values)
    dense[:, j] = values
    if schema.missing_indicator:
      dense[:, num_base + j] = missing
  detail[INVALID_NUMBER] = "expected a number or an empty field"

  # Sparse features.
  sparse = {}
  for feature in schema.sparse:
    buf, starts, ends = spans[feature.column]
    if feature.kind == "multi_value":
      sparse[feature.name] = hashing.hash_multi(
          feature.name, buf, starts, ends, feature.delimiter, feature.empty_as_missing)
    elif feature.transform is not None:
      values, status = parse_ints(buf, starts, ends)
      hours, weekdays = _hour_features_kernel(values, status)
      mark(status != _STATUS_OK, INVALID_VALUE, feature.column)
      derived = hours if feature.transform == "hour_of_day" else weekdays
      sparse[feature.name] = (hashing.hash_ints(feature.name, derived),
                              np.ones(num_rows, np.int32))
      detail[INVALID_VALUE] = "expected a YYMMDDHH time such as 14102100"
    else:
      sparse[feature.name] = (hashing.hash_spans(feature.name, buf, starts, ends),
                              np.ones(num_rows, np.int32))

  keep = reasons == OK
  skipped = {}
  if not keep.all():
    bad = np.flatnonzero(~keep)
    if on_bad_row != "skip":
      first = int(bad[0])
      raise _row_error(first, int(reasons[first]), int(bad_column[first]), columns, spans,
                       path, int(line_numbers[first]), describe_row, detail, location)
    codes, counts = np.unique(reasons[bad], return_counts=True)
    skipped = {REASONS[int(c)]: int(k) for c, k in zip(codes, counts)}

  chunk = Chunk(labels, dense, sparse)
  if skipped:
    chunk = chunk.take(np.flatnonzero(keep))
  return ParsedRows(chunk, keep, skipped)


def _row_error(index: int, reason: int, column_index: int, columns: list[str],
               spans: dict[str, Spans], path: str, line: int,
               describe_row: Callable[[int], str] | None, detail: dict[int, str],
               location: str) -> DataError:
  where = f"{path}, {location} {line}"
  if reason in (FIELD_COUNT, EMPTY_LINE):
    problem = "empty line" if reason == EMPTY_LINE else "wrong number of fields"
    text = describe_row(index) if describe_row else ""
    message = f"Invalid row in {where}: {problem}; {text}. {SKIP_HINT}"
    return DataError(message, path=path, line=line, column="", value=text,
                     reason=REASONS[reason])
  column = columns[column_index]
  buf, starts, ends = spans[column]
  value = bytes(buf[starts[index]:ends[index]]).decode("utf-8", "replace")
  message = (f"Invalid value in {where}, column {column!r}: {_truncate(value)!r}"
             f" ({REASONS[reason]}: {detail.get(reason, '')}). {SKIP_HINT}")
  return DataError(message, path=path, line=line, column=column, value=value,
                   reason=REASONS[reason])


def parse_lines(schema: Schema, lines: Lines, column_names: list[str], *, path: str,
                first_line: int, on_bad_row: str) -> ParsedRows:
  """Parses a tokenized text block whose fields are `column_names` in order.

  Args:
    schema: features to produce.
    lines: the tokenized block.
    column_names: the file's columns in order (field i is column_names[i]).
    path: file name for error messages.
    first_line: 1-based line number of the block's first line.
    on_bad_row: "error" or "skip".
  """
  num_fields = len(column_names)
  reasons = np.zeros(lines.size, np.int8)
  reasons[lines.field_counts != num_fields] = FIELD_COUNT
  reasons[lines.field_counts == 0] = EMPTY_LINE
  spans = {}
  for name in schema.source_columns():
    j = column_names.index(name)
    spans[name] = (lines.buf, lines.field_starts[:, j], lines.field_ends[:, j])
  line_numbers = first_line + np.arange(lines.size, dtype=np.int64)

  def describe(i: int) -> str:
    return (f"expected {num_fields} fields, found {int(lines.field_counts[i])};"
            f" line text: {_truncate(lines.line_text(i))!r}")

  return parse_rows(schema, spans, lines.size, row_reasons=reasons, path=path,
                    line_numbers=line_numbers, on_bad_row=on_bad_row,
                    describe_row=describe)
