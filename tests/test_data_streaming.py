"""Tests of streaming: file sets, gzip, shuffling, epochs, process splits, resume, prefetch."""

import gzip
import json
import threading

import numpy as np
import pytest

from persia_jax.data import build_input, criteo_config


def write_rows(path, first, count, compress=False):
  """Writes Criteo-layout rows whose I1 is the row id, for identifying rows after shuffling."""
  lines = []
  for i in range(first, first + count):
    fields = [str(i % 2), str(i)] + [str(i % 7 - 3)] * 12 + [f"{i:08x}"] + ["ab"] * 24 + [""]
    lines.append("\t".join(fields) + "\n")
  data = "".join(lines).encode()
  if compress:
    with gzip.open(path, "wb") as f:
      f.write(data)
  else:
    path.write_bytes(data)
  return str(path)


def row_ids(batch):
  """Recovers I1 (the row id) from the signed-log dense value."""
  return np.rint(np.expm1(batch.dense[:, 0].astype(np.float64))).astype(np.int64)


def config_for(files, **overrides):
  fields = dict(files=files, test_fraction=0.0, block_size=512, shuffle_buffer=40,
                num_parse_threads=2, prefetch=2)
  fields.update(overrides)
  return criteo_config(**fields)


def collect(config, split="train", batch_size=16, **kwargs):
  with build_input(config, split=split, batch_size=batch_size, **kwargs) as iterator:
    batches = list(iterator)
  ids = np.concatenate([row_ids(b) for b in batches]) if batches else np.zeros(0, np.int64)
  return batches, ids


@pytest.fixture
def three_files(tmp_path):
  write_rows(tmp_path / "part-0.txt", 0, 100)
  write_rows(tmp_path / "part-1.txt.gz", 100, 70, compress=True)
  write_rows(tmp_path / "part-2.txt", 170, 55)
  return str(tmp_path / "part-*")


def test_glob_and_gzip_read_in_file_order(three_files):
  _, ids = collect(config_for(three_files, shuffle=False))
  assert ids.tolist() == list(range(225))


def test_small_blocks_keep_every_row(tmp_path):
  path = write_rows(tmp_path / "rows.txt", 0, 300)
  # 64-byte blocks are shorter than one line, so every block grows to a line.
  _, ids = collect(config_for(path, shuffle=False, block_size=64))
  assert ids.tolist() == list(range(300))


def test_shuffle_is_a_permutation(three_files):
  _, ids = collect(config_for(three_files))
  assert sorted(ids.tolist()) == list(range(225))
  assert ids.tolist() != list(range(225))


def test_shuffle_same_seed_same_order(three_files):
  _, first = collect(config_for(three_files), seed=3)
  _, second = collect(config_for(three_files), seed=3)
  assert first.tolist() == second.tolist()


def test_shuffle_other_seed_other_order(three_files):
  _, first = collect(config_for(three_files), seed=3)
  _, second = collect(config_for(three_files), seed=4)
  assert first.tolist() != second.tolist()


def test_epochs_repeat_in_new_orders(three_files):
  _, ids = collect(config_for(three_files, num_epochs=2), batch_size=25)
  assert ids.shape == (450,)
  assert sorted(ids[:225].tolist()) == list(range(225))
  assert sorted(ids[225:].tolist()) == list(range(225))
  assert ids[:225].tolist() != ids[225:].tolist()


def test_last_partial_batch_kept(three_files):
  batches, _ = collect(config_for(three_files), batch_size=50)
  assert [b.size for b in batches] == [50, 50, 50, 50, 25]


def test_drop_remainder_drops_partial_batch(three_files):
  batches, _ = collect(config_for(three_files, drop_remainder=True), batch_size=50)
  assert [b.size for b in batches] == [50, 50, 50, 50]


def test_test_split_keeps_file_order(tmp_path):
  path = write_rows(tmp_path / "rows.txt", 0, 100)
  batches, ids = collect(config_for(path, test_fraction=0.25), split="test", batch_size=10)
  assert ids.tolist() == list(range(75, 100))
  assert [b.size for b in batches] == [10, 10, 5]


def test_fraction_split_across_files(three_files):
  # 225 rows: train is the first 180, which ends inside part-2 (rows 170..224).
  _, train = collect(config_for(three_files, test_fraction=0.2, shuffle=False))
  _, test = collect(config_for(three_files, test_fraction=0.2), split="test")
  assert train.tolist() == list(range(180))
  assert test.tolist() == list(range(180, 225))


@pytest.mark.parametrize("process_count", [2, 3])
def test_process_split_covers_each_row_once(three_files, process_count):
  seen = []
  for process_index in range(process_count):
    _, ids = collect(config_for(three_files), seed=1, process_index=process_index,
                     process_count=process_count)
    seen.append(ids)
  merged = np.concatenate(seen)
  assert sorted(merged.tolist()) == list(range(225))
  for ids in seen:
    assert abs(len(ids) - 225 / process_count) <= 3


@pytest.mark.parametrize("process_count", [2, 3])
def test_process_split_of_test_split(three_files, process_count):
  config = config_for(three_files, test_fraction=0.2)
  merged = np.concatenate([
      collect(config, split="test", process_index=p, process_count=process_count)[1]
      for p in range(process_count)])
  assert sorted(merged.tolist()) == list(range(180, 225))


@pytest.mark.parametrize("consumed", [1, 3, 7, 13, 18, 19])
def test_resume_gives_same_remaining_batches(three_files, consumed):
  config = config_for(three_files, num_epochs=2)
  _, expected = collect(config, batch_size=24, seed=5)
  with build_input(config, split="train", batch_size=24, seed=5) as iterator:
    head = [row_ids(next(iterator)) for _ in range(consumed)]
    state = json.loads(json.dumps(iterator.state_dict()))
  with build_input(config, split="train", batch_size=24, seed=5) as resumed:
    resumed.load_state_dict(state)
    tail = [row_ids(b) for b in resumed]
  got = np.concatenate(head + tail) if tail else np.concatenate(head)
  assert got.tolist() == expected.tolist()


def test_resume_with_process_split(three_files):
  config = config_for(three_files)
  _, expected = collect(config, batch_size=10, seed=2, process_index=1, process_count=2)
  with build_input(config, split="train", batch_size=10, seed=2, process_index=1,
                   process_count=2) as iterator:
    head = [row_ids(next(iterator)) for _ in range(4)]
    state = iterator.state_dict()
  with build_input(config, split="train", batch_size=10, seed=2, process_index=1,
                   process_count=2) as resumed:
    resumed.load_state_dict(state)
    tail = [row_ids(b) for b in resumed]
  assert np.concatenate(head + tail).tolist() == expected.tolist()


def test_state_from_other_seed_rejected(three_files):
  config = config_for(three_files)
  with build_input(config, split="train", batch_size=10, seed=2) as iterator:
    next(iterator)
    state = iterator.state_dict()
  with build_input(config, split="train", batch_size=10, seed=3) as other:
    with pytest.raises(ValueError, match="seed"):
      other.load_state_dict(state)


def test_endless_epochs(three_files):
  config = config_for(three_files, num_epochs=None)
  with build_input(config, split="train", batch_size=100) as iterator:
    sizes = [next(iterator).size for _ in range(10)]
  assert sizes == [100] * 10


def test_close_mid_epoch_leaves_no_thread(three_files):
  before = set(threading.enumerate())
  iterator = build_input(config_for(three_files, num_epochs=None), split="train",
                         batch_size=8)
  next(iterator)
  next(iterator)
  iterator.close()
  assert set(threading.enumerate()) - before == set()


def test_context_manager_closes_threads(three_files):
  before = set(threading.enumerate())
  with build_input(config_for(three_files), split="train", batch_size=8) as iterator:
    next(iterator)
  assert set(threading.enumerate()) - before == set()


def test_producer_error_reraised_with_message(tmp_path):
  path = write_rows(tmp_path / "rows.txt", 0, 200)
  with open(path, "a") as f:
    f.write("7\t" + "\t".join(["1"] * 39) + "\n")
  config = config_for(path, shuffle=False)
  with build_input(config, split="train", batch_size=8) as iterator:
    with pytest.raises(ValueError) as info:
      list(iterator)
  assert "line 201" in str(info.value)
  assert "'7'" in str(info.value)


@pytest.mark.parametrize("block_size", [100, 333])
def test_resume_with_lines_longer_than_blocks(three_files, block_size):
  config = config_for(three_files, block_size=block_size, shuffle_buffer=30)
  _, expected = collect(config, batch_size=16, seed=9)
  with build_input(config, split="train", batch_size=16, seed=9) as iterator:
    head = [row_ids(next(iterator)) for _ in range(6)]
    state = iterator.state_dict()
  with build_input(config, split="train", batch_size=16, seed=9) as resumed:
    resumed.load_state_dict(state)
    tail = [row_ids(b) for b in resumed]
  assert np.concatenate(head + tail).tolist() == expected.tolist()


def test_load_state_restarts_running_iterator(three_files):
  config = config_for(three_files)
  _, expected = collect(config, batch_size=20, seed=1)
  with build_input(config, split="train", batch_size=20, seed=1) as iterator:
    for _ in range(4):
      next(iterator)
    state = iterator.state_dict()
    next(iterator)
    next(iterator)
    iterator.load_state_dict(state)
    tail = [row_ids(b) for b in iterator]
  assert np.concatenate(tail).tolist() == expected[80:].tolist()


def test_next_after_close_continues(three_files):
  config = config_for(three_files)
  _, expected = collect(config, batch_size=20, seed=6)
  with build_input(config, split="train", batch_size=20, seed=6) as iterator:
    head = [row_ids(next(iterator)) for _ in range(3)]
    iterator.close()
    tail = [row_ids(b) for b in iterator]
  assert np.concatenate(head + tail).tolist() == expected.tolist()
