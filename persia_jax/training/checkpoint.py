"""Training checkpoints: dense state, embedding stores, input position, pending pushes.

One checkpoint is a directory `<workdir>/checkpoints/checkpoint_<step>` with

  dense/            orbax: params, optimizer state, step, and for the fully
                    asynchronous mode the delayed parameter copies;
  embedding/<table> each store's TensorStore checkpoint (rows, optimizer state,
                    counters);
  pending.npz       per-ID gradients computed but not applied yet (the
                    deterministic replay schedule keeps up to tau batches);
                    plain numeric arrays, loaded with allow_pickle=False;
  meta.json         step, input iterator state, RNG key, schedule and config.

Saving is atomic: everything is written into a temporary sibling directory,
which is renamed into place only when complete, so a save killed midway leaves
the previous checkpoints untouched and never a half-written one under a
`checkpoint_*` name. Temporary directories left by a killed save are removed
by the next save.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import shutil
import uuid
from typing import Any, Iterator, Mapping

import numpy as np
import orbax.checkpoint as ocp
from absl import logging

_CHECKPOINT_RE = re.compile(r"^checkpoint_(\d+)$")
_TMP_PREFIX = ".tmp-"


def checkpoint_dir(workdir: str | os.PathLike) -> pathlib.Path:
  return pathlib.Path(workdir) / "checkpoints"


def list_checkpoints(workdir: str | os.PathLike) -> list[tuple[int, pathlib.Path]]:
  """Returns (step, path) of every complete checkpoint, oldest first."""
  root = checkpoint_dir(workdir)
  if not root.is_dir():
    return []
  found = []
  for path in root.iterdir():
    match = _CHECKPOINT_RE.match(path.name)
    if match and (path / "meta.json").is_file():
      found.append((int(match.group(1)), path))
  return sorted(found)


def latest_checkpoint(workdir: str | os.PathLike) -> pathlib.Path | None:
  found = list_checkpoints(workdir)
  return found[-1][1] if found else None


def _fsync_dir(path: pathlib.Path) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


@contextlib.contextmanager
def atomic_directory(final: pathlib.Path) -> Iterator[pathlib.Path]:
  """Yields a temporary sibling of `final`, renamed to `final` when the block succeeds.

  If the block raises, the temporary directory is removed and `final` is left
  as it was. An existing `final` is moved aside first and deleted after the
  rename, so `final` always names a complete directory or nothing.
  """
  final = pathlib.Path(final)
  final.parent.mkdir(parents=True, exist_ok=True)
  tmp = final.parent / f"{_TMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
  tmp.mkdir()
  try:
    yield tmp
    _fsync_dir(tmp)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if final.exists():
    old = final.parent / f"{_TMP_PREFIX}old-{final.name}-{uuid.uuid4().hex[:8]}"
    os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.rename(tmp, final)
  _fsync_dir(final.parent)


def save_dense(path: pathlib.Path, tree: Any) -> None:
  """Saves a pytree of arrays with orbax and waits until it is written."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(pathlib.Path(path).absolute(), tree)
  checkpointer.wait_until_finished()
  checkpointer.close()


def restore_dense(path: pathlib.Path, target: Any = None) -> Any:
  checkpointer = ocp.StandardCheckpointer()
  tree = checkpointer.restore(pathlib.Path(path).absolute(), target)
  checkpointer.close()
  return tree


def _save_pending(path: pathlib.Path, pending) -> list[dict[str, Any]]:
  arrays = {}
  index = []
  for i, (step, table_grads) in enumerate(pending):
    tables = []
    for table, (ids, grads) in table_grads.items():
      arrays[f"p{i}_{len(tables)}_ids"] = np.asarray(ids, np.uint64)
      arrays[f"p{i}_{len(tables)}_grads"] = np.asarray(grads, np.float32)
      tables.append(table)
    index.append({"step": int(step), "tables": tables})
  with open(path, "wb") as f:
    np.savez(f, **arrays)
    f.flush()
    os.fsync(f.fileno())
  return index


def _load_pending(path: pathlib.Path, index: list[dict[str, Any]]):
  if not index:
    return []
  pending = []
  with np.load(path, allow_pickle=False) as data:
    for i, entry in enumerate(index):
      table_grads = {}
      for j, table in enumerate(entry["tables"]):
        table_grads[table] = (data[f"p{i}_{j}_ids"], data[f"p{i}_{j}_grads"])
      pending.append((entry["step"], table_grads))
  return pending


def save_checkpoint(workdir: str | os.PathLike, step: int, *, dense: Any,
                    stores: Mapping[str, Any], meta: Mapping[str, Any],
                    pending=(), keep: int = 3) -> pathlib.Path:
  """Writes a checkpoint for `step` atomically and keeps the newest `keep`.

  Args:
    workdir: the run's workdir.
    step: the number of completed training steps.
    dense: a pytree of arrays (params, optimizer state, ...), saved with orbax.
    stores: table name to embedding store; each store saves itself.
    meta: JSON-serializable run state (input position, RNG key, ...).
    pending: (step, per-table gradients) not applied to the stores yet.
    keep: number of checkpoints to keep; older ones are deleted after the save.

  Returns:
    The path of the new checkpoint.
  """
  root = checkpoint_dir(workdir)
  root.mkdir(parents=True, exist_ok=True)
  for stale in root.glob(_TMP_PREFIX + "*"):
    shutil.rmtree(stale, ignore_errors=True)

  final = root / f"checkpoint_{step:09d}"
  with atomic_directory(final) as tmp:
    save_dense(tmp / "dense", dense)
    (tmp / "embedding").mkdir()
    for table, store in stores.items():
      store.save(str(tmp / "embedding" / table))
    pending_index = _save_pending(tmp / "pending.npz", pending)
    with open(tmp / "meta.json", "w") as f:
      json.dump({**meta, "step": int(step), "pending": pending_index}, f, indent=2)
      f.flush()
      os.fsync(f.fileno())
  logging.info("Saved checkpoint %s", final)

  for _, path in list_checkpoints(workdir)[:-keep] if keep > 0 else []:
    shutil.rmtree(path, ignore_errors=True)
  return final


def resolve_checkpoint(path: str | os.PathLike) -> pathlib.Path:
  """Returns the checkpoint at `path`, or the latest one if `path` is a workdir.

  Raises:
    FileNotFoundError: if `path` is neither a checkpoint nor a workdir with one.
  """
  path = pathlib.Path(path)
  if (path / "meta.json").is_file():
    return path
  latest = latest_checkpoint(path)
  if latest is None:
    raise FileNotFoundError(
        f"config.restore_from={str(path)!r} is neither a checkpoint directory (with"
        " meta.json) nor a workdir with checkpoints. Point it at a"
        " <workdir>/checkpoints/checkpoint_<step> directory or at a workdir.")
  return latest


def load_meta(path: str | os.PathLike) -> dict[str, Any]:
  with open(pathlib.Path(path) / "meta.json") as f:
    return json.load(f)


def restore_checkpoint(path: str | os.PathLike, *, dense_target: Any,
                       stores: Mapping[str, Any]):
  """Restores a checkpoint written by `save_checkpoint`.

  Args:
    path: the checkpoint directory.
    dense_target: a pytree with the structure, shapes, dtypes and shardings to
      restore the dense state into (for example the freshly initialised state).
    stores: table name to store; each is restored in place.

  Returns:
    (dense, meta, pending): the restored dense pytree, the meta dict and the
    pending per-ID gradients.
  """
  path = pathlib.Path(path)
  meta = load_meta(path)
  dense = restore_dense(path / "dense", dense_target)
  saved_tables = sorted(p.name for p in (path / "embedding").iterdir())
  if saved_tables != sorted(stores):
    raise ValueError(
        f"Checkpoint {path} contains embedding tables {saved_tables} but the config"
        f" defines {sorted(stores)}; restore with the config the run was saved with.")
  for table, store in stores.items():
    store.restore(str(path / "embedding" / table))
  pending = _load_pending(path / "pending.npz", meta.get("pending", []))
  return dense, meta, pending
