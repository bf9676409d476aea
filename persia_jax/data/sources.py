"""File sources: delimited text (Criteo, Avazu, Taobao, generic CSV) and Parquet.

A source turns files into `Block`s, units of raw input read in file order
from a cursor, and parses each block into a `ParsedBlock`. Reading happens on
one thread (I/O bound), parsing on a thread pool (numba kernels release the
GIL). Memory stays bounded by the block size times the number of blocks in
flight, whatever the file size.

A cursor is `{"offset": int, "line": int, "row": int}`: for text files the
byte offset in the uncompressed stream, the 1-based line number there and the
number of data rows before it; for Parquet the row offset. Reading from a
cursor gives the same blocks as reading up to it, which makes iterator
positions exact. Gzip files (".gz" name or gzip magic bytes) are decompressed
on the fly; seeking in them re-decompresses from the start.

Headers are checked when the source is built. A header that does not match
the schema is an error even with on_bad_row="skip", because skipping it would
drop a whole file.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import io
import os
import pathlib
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from persia_jax.data import parsing
from persia_jax.data.chunk import Chunk
from persia_jax.data.parsing import DataError
from persia_jax.data.schema import Schema

_REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


@dataclasses.dataclass
class Block:
  """Raw input of consecutive rows of one file.

  Attributes:
    file_index: index of the file in the source's sorted file list.
    payload: bytes of whole lines (text), a pyarrow RecordBatch (Parquet), or
      None for a skipped empty file.
    first_line: 1-based line (or row) number of the first row.
    first_row: data-row index in the file of the first row.
    end: cursor just after the block.
    skipped: rows or files skipped before parsing, by reason.
  """

  file_index: int
  payload: Any
  first_line: int
  first_row: int
  end: dict[str, int]
  skipped: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ParsedBlock:
  """Parsed rows of a block.

  Attributes:
    chunk: the good rows.
    rows: int64 [chunk.size] data-row index in the file of each good row.
    file_index: as in `Block`.
    end: as in `Block`.
    rows_read: rows in the block, good or bad.
    skipped: reason to count of skipped rows (and empty files).
  """

  chunk: Chunk
  rows: np.ndarray
  file_index: int
  end: dict[str, int]
  rows_read: int
  skipped: dict[str, int]


def empty_parsed_block(schema, block) -> ParsedBlock:
  """Returns the parse result of a block without rows (an empty file)."""
  return ParsedBlock(
      Chunk(np.zeros(0, np.float32), np.zeros((0, schema.num_dense), np.float32),
            {n: (np.zeros(0, np.uint64), np.zeros(0, np.int32)) for n in schema.sparse_names}),
      np.zeros(0, np.int64), block.file_index, block.end, 0, dict(block.skipped))


def resolve_path(pattern: str) -> str:
  """Resolves a relative path or glob against the current directory, then the repo root."""
  path = pathlib.Path(os.path.expanduser(pattern))
  if path.is_absolute():
    return str(path)
  local = pathlib.Path.cwd() / path
  if glob.glob(str(local)):
    return str(local)
  in_repo = _REPO_ROOT / path
  if glob.glob(str(in_repo)):
    return str(in_repo)
  return str(local)


def expand_files(patterns: Any) -> list[str]:
  """Expands file names and globs into a sorted list of distinct paths.

  Raises:
    FileNotFoundError: if a pattern matches no file.
  """
  if isinstance(patterns, str):
    patterns = [patterns]
  files = []
  for pattern in patterns:
    resolved = resolve_path(str(pattern))
    matches = sorted(p for p in glob.glob(resolved) if os.path.isfile(p))
    if not matches:
      if os.path.isabs(str(pattern)):
        raise FileNotFoundError(
            f"Data file {pattern!r} not found. Check data.files (or data.test_files) in"
            " the config.")
      places = sorted({os.getcwd(), str(_REPO_ROOT)})
      raise FileNotFoundError(
          f"Data file {pattern!r} not found (looked in {' and '.join(places)})."
          " Check data.files in the config or pass an absolute path.")
    files.extend(m for m in matches if m not in files)
  return files


def _is_gzip(path: str) -> bool:
  if path.endswith(".gz"):
    return True
  with open(path, "rb") as f:
    return f.read(2) == b"\x1f\x8b"


def _open_binary(path: str) -> io.BufferedIOBase:
  if _is_gzip(path):
    return gzip.open(path, "rb")
  return open(path, "rb")


class TextSource:
  """Delimited text files with a fixed column layout.

  Args:
    files: file paths (already expanded).
    schema: features to produce.
    columns: the file's column names in order, or None to take them from
      the header (then `header` must be True).
    delimiter: one-character field separator.
    header: whether each file starts with a header line of column names.
    block_size: bytes read per block; a longer line makes a longer block.
    on_bad_row: "error" or "skip".
  """

  location = "line"

  def __init__(self, files: list[str], schema: Schema, *, columns: list[str] | None,
               delimiter: str, header: bool, block_size: int, on_bad_row: str):
    if columns is None and not header:
      raise ValueError("data.columns must list the file's columns when data.header is False.")
    if len(delimiter.encode()) != 1:
      raise ValueError(f"data.delimiter must be one ASCII character, got {delimiter!r}.")
    self.files = files
    self.schema = schema
    self.delimiter = delimiter
    self.header = header
    self.block_size = int(block_size)
    self.on_bad_row = on_bad_row
    self._columns = list(columns) if columns is not None else None
    self._file_columns: dict[int, list[str]] = {}
    if self._columns is not None:
      self._check_columns(self._columns, origin="data.columns", path=None)
    if header:
      # Checked up front so that a header mismatch fails at build time, not
      # after the trainer has started.
      for file_index in range(len(files)):
        self.start_cursor(file_index)

  def _check_columns(self, columns: list[str], origin: str, path: str | None) -> None:
    missing = [c for c in self.schema.source_columns() if c not in columns]
    if missing:
      where = f" of {path}, line 1" if path else ""
      raise DataError(
          f"Columns {missing} used by the feature schema are not in {origin}{where}"
          f" ({columns}). Fix data.features or data.columns to match the file.",
          path=path or "", line=1, column=missing[0], value=str(columns), reason="header")

  def _read_header(self, file_index: int, f: io.BufferedIOBase) -> int:
    """Validates the header line; returns its length in bytes."""
    path = self.files[file_index]
    line = f.readline()
    if not line:
      return 0  # An empty file; `blocks` reports it.
    text = line.rstrip(b"\r\n").decode("utf-8", "replace")
    found = text.split(self.delimiter) if text else []
    if self._columns is None:
      self._check_columns(found, origin="the header", path=path)
      self._file_columns[file_index] = found
    elif found != self._columns:
      position = next((i for i, (a, b) in enumerate(zip(found, self._columns)) if a != b),
                      min(len(found), len(self._columns)))
      got = found[position] if position < len(found) else "(end of line)"
      want = self._columns[position] if position < len(self._columns) else "(end of line)"
      raise DataError(
          f"Header of {path}, line 1, does not match data.columns: column"
          f" {position + 1} is {got!r}, expected {want!r}. Set data.columns to the"
          f" file's header (or None to read it from the file) or fix the file.",
          path=path, line=1, column=want, value=got, reason="header")
    return len(line)

  def columns_of(self, file_index: int) -> list[str]:
    if self._columns is not None:
      return self._columns
    return self._file_columns[file_index]

  def start_cursor(self, file_index: int) -> dict[str, int]:
    """Returns the cursor of the first data row (after the header)."""
    if not self.header:
      return {"offset": 0, "line": 1, "row": 0}
    with _open_binary(self.files[file_index]) as f:
      size = self._read_header(file_index, f)
    return {"offset": size, "line": 2, "row": 0}

  def blocks(self, file_index: int, cursor: dict[str, int]) -> Iterator[Block]:
    """Reads whole-line blocks from `cursor` to the end of the file."""
    path = self.files[file_index]
    with _open_binary(path) as f:
      if self.header:
        self._read_header(file_index, f)
      f.seek(cursor["offset"])
      offset, line, row = cursor["offset"], cursor["line"], cursor["row"]
      at_start = row == 0
      # A block is the longest run of whole lines within `block_size` bytes
      # from its start (grown by `block_size` until it holds one line). It
      # depends only on the bytes from its start, so reading from a saved
      # cursor gives the same blocks as reading through.
      buf = b""
      eof = False
      while True:
        limit = self.block_size
        while True:
          if len(buf) < limit and not eof:
            data = f.read(limit - len(buf))
            eof = len(data) < limit - len(buf)
            buf += data
          cut = buf.rfind(b"\n", 0, limit)
          if cut >= 0:
            body, buf = buf[:cut + 1], buf[cut + 1:]
            complete = True
            break
          if eof and len(buf) <= limit:
            body, buf = buf, b""
            complete = False
            break
          limit += self.block_size
        if not body:
          if at_start:
            yield self._empty_file(file_index, line)
          return
        at_start = False
        block = self._block(file_index, body, offset, line, row, complete=complete)
        yield block
        offset, line, row = block.end["offset"], block.end["line"], block.end["row"]

  def truncate(self, block: Block, num_rows: int) -> Block:
    """Returns the first `num_rows` rows of a block."""
    if block.payload is None or block.end["row"] - block.first_row <= num_rows:
      return block
    view = np.frombuffer(block.payload, np.uint8)
    cut = int(np.flatnonzero(view == 10)[num_rows - 1]) + 1 if num_rows > 0 else 0
    offset = block.end["offset"] - len(block.payload) + cut
    end = {"offset": offset, "line": block.first_line + num_rows,
           "row": block.first_row + num_rows}
    return Block(block.file_index, block.payload[:cut], block.first_line, block.first_row,
                 end, dict(block.skipped))

  def _block(self, file_index, body, offset, line, row, complete) -> Block:
    num_lines = body.count(b"\n") + (0 if complete else 1)
    end = {"offset": offset + len(body), "line": line + num_lines, "row": row + num_lines}
    return Block(file_index, body, line, row, end)

  def _empty_file(self, file_index: int, line: int) -> Block:
    path = self.files[file_index]
    if self.on_bad_row != "skip":
      raise DataError(
          f"Data file {path} contains no data rows (line {line} is the end of the"
          f" file). Remove it from data.files, or set on_bad_row='skip' (for example"
          f" --config.data.on_bad_row=skip) to skip and count empty files.",
          path=path, line=line, reason="empty_file")
    end = {"offset": 0, "line": line, "row": 0}
    return Block(file_index, None, line, 0, end, skipped={"empty_file": 1})

  def parse(self, block: Block) -> ParsedBlock:
    if block.payload is None:
      return empty_parsed_block(self.schema, block)
    columns = self.columns_of(block.file_index)
    buf = np.frombuffer(block.payload, np.uint8)
    lines = parsing.tokenize(buf, self.delimiter, len(columns))
    parsed = parsing.parse_lines(self.schema, lines, columns,
                                 path=self.files[block.file_index],
                                 first_line=block.first_line, on_bad_row=self.on_bad_row)
    rows = block.first_row + np.flatnonzero(parsed.keep).astype(np.int64)
    return ParsedBlock(parsed.chunk, rows, block.file_index, block.end, lines.size,
                       parsed.skipped)

  def row_count(self, file_index: int, split_row: int | None = None
                ) -> tuple[int, dict[str, int] | None]:
    """Counts the data rows of a file by scanning it once (bounded memory).

    Args:
      file_index: which file.
      split_row: if set, also returns the cursor of this data row.

    Returns:
      (number of data rows, cursor of `split_row` or None).
    """
    start = self.start_cursor(file_index)
    offset, line, rows = start["offset"], start["line"], 0
    split_cursor = None
    last = b"\n"
    with _open_binary(self.files[file_index]) as f:
      f.seek(offset)
      while True:
        data = f.read(max(self.block_size, 1 << 20))
        if not data:
          break
        count = data.count(b"\n")
        if split_row is not None and split_cursor is None and rows + count >= split_row:
          # Find the byte offset just after the (split_row - rows)-th newline.
          view = np.frombuffer(data, np.uint8)
          newlines = np.flatnonzero(view == 10)
          need = split_row - rows
          at = 0 if need == 0 else int(newlines[need - 1]) + 1
          split_cursor = {"offset": offset + at, "line": line + need, "row": split_row}
        offset += len(data)
        line += count
        rows += count
        last = data[-1:]
    if last != b"\n":
      rows += 1
    if split_row is not None and split_cursor is None:
      split_cursor = {"offset": offset, "line": line, "row": rows}
    return rows, split_cursor


class ParquetSource:
  """Parquet files; each needed column is read as text and parsed like CSV fields.

  Args:
    files: file paths.
    schema: features to produce.
    block_size: rows per block.
    on_bad_row: "error" or "skip".
  """

  location = "row"
  header = False

  def __init__(self, files: list[str], schema: Schema, *, block_size: int, on_bad_row: str):
    self.files = files
    self.schema = schema
    self.block_rows = int(block_size)
    self.on_bad_row = on_bad_row

  def _open(self, file_index: int) -> pq.ParquetFile:
    path = self.files[file_index]
    try:
      parquet_file = pq.ParquetFile(path)
    except pa.ArrowInvalid as error:
      raise DataError(f"Could not read {path} as Parquet: {error}. Check data.format"
                      " and data.files.", path=path, reason="format") from error
    names = parquet_file.schema_arrow.names
    missing = [c for c in self.schema.source_columns() if c not in names]
    if missing:
      raise DataError(
          f"Columns {missing} used by the feature schema are not in {path} (it has"
          f" {names}). Fix data.features to match the file.",
          path=path, line=0, column=missing[0], value=str(names), reason="header")
    return parquet_file

  def start_cursor(self, file_index: int) -> dict[str, int]:
    return {"offset": 0, "line": 1, "row": 0}

  def blocks(self, file_index: int, cursor: dict[str, int]) -> Iterator[Block]:
    parquet_file = self._open(file_index)
    metadata = parquet_file.metadata
    if metadata.num_rows == 0 and cursor["row"] == 0:
      if self.on_bad_row != "skip":
        path = self.files[file_index]
        raise DataError(
            f"Data file {path} contains no rows. Remove it from data.files, or set"
            " on_bad_row='skip' (for example --config.data.on_bad_row=skip) to skip"
            " and count empty files.", path=path, reason="empty_file")
      yield Block(file_index, None, 1, 0, dict(cursor), skipped={"empty_file": 1})
      return
    columns = self.schema.source_columns()
    row = cursor["row"]
    group_start = 0
    for group in range(metadata.num_row_groups):
      group_rows = metadata.row_group(group).num_rows
      if group_start + group_rows <= row:
        group_start += group_rows
        continue
      position = group_start
      for batch in parquet_file.iter_batches(batch_size=self.block_rows, row_groups=[group],
                                             columns=columns, use_threads=False):
        batch_end = position + batch.num_rows
        if batch_end > row:
          part = batch.slice(max(row - position, 0))
          end = {"offset": batch_end, "line": batch_end + 1, "row": batch_end}
          yield Block(file_index, part, row + 1, row, end)
          row = batch_end
        position = batch_end
      group_start += group_rows

  def parse(self, block: Block) -> ParsedBlock:
    if block.payload is None:
      return empty_parsed_block(self.schema, block)
    batch = block.payload
    spans = {name: arrow_spans(batch.column(name)) for name in self.schema.source_columns()}
    n = batch.num_rows
    parsed = parsing.parse_rows(
        self.schema, spans, n, row_reasons=None, path=self.files[block.file_index],
        line_numbers=block.first_line + np.arange(n, dtype=np.int64),
        on_bad_row=self.on_bad_row, location="row")
    rows = block.first_row + np.flatnonzero(parsed.keep).astype(np.int64)
    return ParsedBlock(parsed.chunk, rows, block.file_index, block.end, n, parsed.skipped)

  def truncate(self, block: Block, num_rows: int) -> Block:
    """Returns the first `num_rows` rows of a block."""
    if block.payload is None or block.payload.num_rows <= num_rows:
      return block
    end_row = block.first_row + num_rows
    end = {"offset": end_row, "line": end_row + 1, "row": end_row}
    return Block(block.file_index, block.payload.slice(0, num_rows), block.first_line,
                 block.first_row, end)

  def row_count(self, file_index: int, split_row: int | None = None
                ) -> tuple[int, dict[str, int] | None]:
    rows = self._open(file_index).metadata.num_rows
    cursor = None if split_row is None else {"offset": split_row, "line": split_row + 1,
                                             "row": split_row}
    return rows, cursor


def arrow_spans(array: pa.Array) -> parsing.Spans:
  """Returns (buf, starts, ends) of an Arrow array's values as text; nulls become empty."""
  if isinstance(array, pa.ChunkedArray):
    array = array.combine_chunks()
  if not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
    array = pc.cast(array, pa.string())
  array = pc.fill_null(array, "")
  offset_type = np.int64 if pa.types.is_large_string(array.type) else np.int32
  _, offsets_buffer, data_buffer = array.buffers()
  offsets = np.frombuffer(offsets_buffer, offset_type)[array.offset:array.offset + len(array) + 1]
  data = (np.frombuffer(data_buffer, np.uint8) if data_buffer is not None
          else np.zeros(0, np.uint8))
  offsets = offsets.astype(np.int64)
  return data, offsets[:-1], offsets[1:]
