"""Helpers shared by the benchmark and study scripts: machine facts and docs sections."""

from __future__ import annotations

import json
import os
import pathlib
import platform
import re
import subprocess

import numpy as np
from absl import logging


def machine_info() -> dict[str, str | int]:
  """Returns the CPU model, core count, architecture and library versions of this machine."""
  model = platform.processor() or platform.machine()
  try:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"^Model name:\s*(.+)$", lscpu, re.MULTILINE)
    if match:
      model = match.group(1).strip()
  except (OSError, subprocess.CalledProcessError):
    pass
  info: dict[str, str | int] = {"cpu": model, "cores": os.cpu_count() or 0,
                                "machine": platform.machine(),
                                "python": platform.python_version(), "numpy": np.__version__}
  try:
    import jax  # pylint: disable=g-import-not-at-top
    info["jax"] = jax.__version__
  except ImportError:
    pass
  return info


def describe_machine(info: dict | None = None) -> str:
  """Formats `machine_info()` as one line, e.g. "Intel Xeon, 2 cores (x86_64)"."""
  info = info or machine_info()
  return f"{info['cpu']}, {info['cores']} cores ({info['machine']})"


def replace_markdown_section(text: str, title: str, section: str) -> str:
  """Replaces the "## <title>" section of `text` (up to the next "## ") or appends it.

  `section` is the new section including its "## <title>" heading. Empty text
  gets a "# Benchmarks" heading first.
  """
  pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
  if pattern.search(text):
    return pattern.sub(lambda _: section.rstrip("\n") + "\n\n", text, count=1).rstrip("\n") + "\n"
  if not text.strip():
    text = "# Benchmarks\n\nMeasured numbers of persia_jax, each with the command and machine.\n"
  return text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"


def update_docs_section(path: str | os.PathLike, title: str, section: str) -> None:
  """Rewrites the "## <title>" section of the markdown file at `path`."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  existing = path.read_text() if path.exists() else ""
  path.write_text(replace_markdown_section(existing, title, section))


def write_results(results: dict, json_path: str | os.PathLike, *, docs_path: str,
                  title: str, section: str) -> None:
  """Writes `results` as JSON, prints `section` and puts it into `docs_path` (unless empty)."""
  json_path = pathlib.Path(json_path)
  json_path.parent.mkdir(parents=True, exist_ok=True)
  json_path.write_text(json.dumps(results, indent=2) + "\n")
  logging.info("Wrote %s.", json_path)
  print(section)
  if docs_path:
    update_docs_section(docs_path, title, section)
    logging.info("Updated the %r section of %s.", title, docs_path)
