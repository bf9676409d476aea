"""libsvm (`label idx:value ...`) and libFM (`label field:idx:value ...`) text.

How tokens map to features:
  * A line is a label followed by tokens separated by spaces or tabs.
  * `idx:value` is field 0; `field:idx:value` names its field. Fields and
    indices are non-negative integers, and a field must be below
    `num_fields`.
  * Each field f feeds the multi_value feature whose column is "f". The ID of
    a token is `feature_id(feature name, idx text)`, so index 7 in two fields
    gives two IDs. The value only decides presence: a token with value 0 is
    dropped (libsvm's sparse zero), any other value keeps the ID. A feature
    row of one sample may therefore hold several IDs (sum pooling by
    default).
  * A dense feature with column "f:idx" (or "idx" for field 0) takes that
    token's value, transformed like any dense feature; that token then gives
    no ID. A missing token is a missing value (0).
  * Labels must be 0 or 1; with `minus_one_is_negative` the libsvm
    convention -1 is read as 0.
NOTE: `SparseInput` has no per-ID weights, so values other than 0 and 1 on
ID tokens are not passed on; declare such an index dense to keep its value.
"""

from __future__ import annotations

import numba
import numpy as np

from persia_jax.data import hashing, parsing
from persia_jax.data.chunk import Chunk
from persia_jax.data.parsing import DataError
from persia_jax.data.schema import Schema
from persia_jax.data.sources import Block, ParsedBlock, TextSource

_BAD_TOKEN = 1  # Malformed field, index or value.
_BAD_LABEL = 2
_EMPTY = 3


@numba.njit(nogil=True, cache=True)
def _libsvm_kernel(buf, num_fields, minus_one_is_negative):
  size = buf.shape[0]
  # Pass 1: lines and tokens.
  num_lines = 0
  num_tokens = 0
  in_token = False
  for k in range(size):
    c = buf[k]
    if c == 10:
      num_lines += 1
      in_token = False
    elif c == 32 or c == 9 or c == 13:
      in_token = False
    elif not in_token:
      num_tokens += 1
      in_token = True
  if size > 0 and buf[size - 1] != 10:
    num_lines += 1

  labels = np.zeros(num_lines, np.float32)
  status = np.zeros(num_lines, np.int8)
  bad_starts = np.zeros(num_lines, np.int64)
  bad_ends = np.zeros(num_lines, np.int64)
  bad_token = np.zeros(num_lines, np.int32)
  token_rows = np.zeros(num_tokens, np.int64)
  token_fields = np.zeros(num_tokens, np.int64)
  token_indices = np.zeros(num_tokens, np.int64)
  index_starts = np.zeros(num_tokens, np.int64)
  index_ends = np.zeros(num_tokens, np.int64)
  token_values = np.zeros(num_tokens, np.float64)

  # Pass 2: parse each line's label and tokens; the first bad token marks the line.
  t = 0
  start = 0
  for i in range(num_lines):
    end = start
    while end < size and buf[end] != 10:
      end += 1
    next_start = end + 1
    k = start
    position = 0
    while True:
      while k < end and (buf[k] == 32 or buf[k] == 9 or buf[k] == 13):
        k += 1
      if k >= end:
        break
      token_start = k
      first_colon = -1
      second_colon = -1
      num_colons = 0
      while k < end and buf[k] != 32 and buf[k] != 9 and buf[k] != 13:
        if buf[k] == 58:
          num_colons += 1
          if first_colon < 0:
            first_colon = k
          elif second_colon < 0:
            second_colon = k
        k += 1
      token_end = k

      if status[i] != 0:
        position += 1
        continue
      if position == 0:
        value, code = parsing.parse_float_span(buf, token_start, token_end)
        if code == 0 and value == -1.0 and minus_one_is_negative:
          value = 0.0
        if code != 0 or (value != 0.0 and value != 1.0):
          status[i] = _BAD_LABEL
          bad_starts[i] = token_start
          bad_ends[i] = token_end
        labels[i] = value
      else:
        # Token: idx:value or field:idx:value.
        field = 0
        ok = num_colons == 1 or num_colons == 2
        if num_colons == 2:
          field, code = parsing.parse_int_span(buf, token_start, first_colon)
          ok = code == 0 and 0 <= field < num_fields
          index_start = first_colon + 1
          index_end = second_colon
        else:
          index_start = token_start
          index_end = first_colon
        if ok:
          index, code = parsing.parse_int_span(buf, index_start, index_end)
          ok = code == 0 and index >= 0
        if ok:
          value_start = second_colon + 1 if num_colons == 2 else first_colon + 1
          value, code = parsing.parse_float_span(buf, value_start, token_end)
          ok = code == 0
        if ok:
          token_rows[t] = i
          token_fields[t] = field
          token_indices[t] = index
          index_starts[t] = index_start
          index_ends[t] = index_end
          token_values[t] = value
          t += 1
        else:
          status[i] = _BAD_TOKEN
          bad_starts[i] = token_start
          bad_ends[i] = token_end
          bad_token[i] = position
      position += 1
    if position == 0:
      status[i] = _EMPTY
    start = next_start
  return (labels, status, bad_starts, bad_ends, bad_token, token_rows[:t],
          token_fields[:t], token_indices[:t], index_starts[:t], index_ends[:t],
          token_values[:t])


class LibsvmSource(TextSource):
  """libsvm or libFM files; see the module docstring for the token mapping.

  Args:
    files: file paths.
    schema: multi_value features (column = field number) and optional dense
      features (column = "field:idx" or "idx").
    num_fields: fields 0 .. num_fields - 1 are valid.
    minus_one_is_negative: read label -1 as 0.
    block_size: bytes per block.
    on_bad_row: "error" or "skip".
  """

  def __init__(self, files: list[str], schema: Schema, *, num_fields: int,
               minus_one_is_negative: bool, block_size: int, on_bad_row: str):
    super().__init__(files, schema, columns=["label"], delimiter=" ", header=False,
                     block_size=block_size, on_bad_row=on_bad_row)
    self.num_fields = int(num_fields)
    self.minus_one_is_negative = bool(minus_one_is_negative)
    self._sparse_fields = []
    for feature in schema.sparse:
      if feature.kind != "multi_value" or not feature.column.isdigit():
        raise ValueError(
            f"libsvm feature {feature.name!r} must be kind 'multi_value' with a field"
            f" number as column, got kind {feature.kind!r} and column {feature.column!r}.")
      self._sparse_fields.append(int(feature.column))
    self._dense_keys = []
    for feature in schema.dense:
      parts = feature.column.split(":")
      if len(parts) == 1:
        parts = ["0", parts[0]]
      if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ValueError(
            f"libsvm dense feature {feature.name!r} needs column 'field:idx' or 'idx',"
            f" got {feature.column!r}.")
      self._dense_keys.append((int(parts[0]), int(parts[1])))

  def _check_columns(self, columns, origin, path) -> None:
    del columns, origin, path  # libsvm lines have no named columns.

  def parse(self, block: Block) -> ParsedBlock:
    if block.payload is None:
      return super().parse(block)
    buf = np.frombuffer(block.payload, np.uint8)
    (labels, status, bad_starts, bad_ends, bad_token, token_rows, token_fields,
     token_indices, index_starts, index_ends, token_values) = _libsvm_kernel(
         buf, self.num_fields, self.minus_one_is_negative)
    num_lines = labels.shape[0]
    path = self.files[block.file_index]
    skipped = {}
    if status.any():
      bad = np.flatnonzero(status)
      if self.on_bad_row != "skip":
        raise self._error(path, block.first_line, int(bad[0]), status, bad_starts, bad_ends,
                          bad_token, buf)
      names = {_BAD_TOKEN: parsing.REASONS[parsing.INVALID_NUMBER],
               _BAD_LABEL: parsing.REASONS[parsing.INVALID_LABEL],
               _EMPTY: parsing.REASONS[parsing.EMPTY_LINE]}
      codes, counts = np.unique(status[bad], return_counts=True)
      skipped = {names[int(c)]: int(n) for c, n in zip(codes, counts)}
    keep = status == 0
    new_row = np.cumsum(keep) - 1
    num_good = int(keep.sum())
    token_keep = keep[token_rows]

    dense = np.zeros((num_good, self.schema.num_dense), np.float32)
    is_dense_token = np.zeros(token_rows.shape[0], bool)
    for j, ((field, index), feature) in enumerate(zip(self._dense_keys, self.schema.dense)):
      match = token_keep & (token_fields == field) & (token_indices == index)
      is_dense_token |= match
      values = np.zeros(num_good, np.float64)
      values[new_row[token_rows[match]]] = token_values[match]
      if feature.transform == "signed_log1p":
        values = parsing.signed_log1p(values)
      dense[:, j] = values
      if self.schema.missing_indicator:
        present = np.zeros(num_good, bool)
        present[new_row[token_rows[match]]] = True
        dense[:, len(self.schema.dense) + j] = ~present

    sparse = {}
    for field, feature in zip(self._sparse_fields, self.schema.sparse):
      match = token_keep & ~is_dense_token & (token_fields == field) & (token_values != 0.0)
      rows = new_row[token_rows[match]]
      ids = hashing.hash_spans(feature.name, buf, index_starts[match], index_ends[match])
      lengths = np.bincount(rows, minlength=num_good).astype(np.int32)
      if feature.empty_as_missing and (lengths == 0).any():
        empty_rows = np.flatnonzero(lengths == 0)
        missing_id = np.uint64(hashing.feature_id(feature.name, ""))
        all_rows = np.concatenate([rows, empty_rows])
        all_ids = np.concatenate([ids, np.full(empty_rows.shape[0], missing_id, np.uint64)])
        order = np.argsort(all_rows, kind="stable")
        ids = all_ids[order]
        lengths[empty_rows] = 1
      sparse[feature.name] = (ids, lengths)

    chunk = Chunk(labels[keep], dense, sparse)
    rows_in_file = block.first_row + np.flatnonzero(keep).astype(np.int64)
    return ParsedBlock(chunk, rows_in_file, block.file_index, block.end, num_lines, skipped)

  def _error(self, path, first_line, i, status, bad_starts, bad_ends, bad_token, buf
             ) -> DataError:
    line = first_line + i
    value = bytes(buf[bad_starts[i]:bad_ends[i]]).decode("utf-8", "replace")
    if status[i] == _EMPTY:
      return DataError(f"Invalid row in {path}, line {line}: empty line. {parsing.SKIP_HINT}",
                       path=path, line=line, reason=parsing.REASONS[parsing.EMPTY_LINE])
    if status[i] == _BAD_LABEL:
      accepted = "0, 1 or -1" if self.minus_one_is_negative else "0 or 1"
      return DataError(
          f"Invalid value in {path}, line {line}, column 'label': {value!r}"
          f" (invalid_label: a label must be {accepted}). {parsing.SKIP_HINT}",
          path=path, line=line, column="label", value=value,
          reason=parsing.REASONS[parsing.INVALID_LABEL])
    column = f"token {int(bad_token[i])}"
    return DataError(
        f"Invalid value in {path}, line {line}, {column}: {value!r} (invalid_number:"
        f" expected idx:value or field:idx:value with integer field < {self.num_fields},"
        f" integer idx >= 0 and a numeric value). {parsing.SKIP_HINT}",
        path=path, line=line, column=column, value=value,
        reason=parsing.REASONS[parsing.INVALID_NUMBER])
