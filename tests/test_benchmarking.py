"""Docs sections and machine facts shared by the benchmark scripts."""

from persia_jax import benchmarking

DOC = "# Benchmarks\n\nIntro.\n\n## Data pipeline\n\nold data\n\n## Embedding store\n\nold store\n"


def test_replace_keeps_other_sections():
  text = benchmarking.replace_markdown_section(DOC, "Data pipeline", "## Data pipeline\n\nnew\n")
  assert "new" in text
  assert "old data" not in text
  assert "## Embedding store\n\nold store" in text
  assert text.index("## Data pipeline") < text.index("## Embedding store")


def test_replace_last_section():
  text = benchmarking.replace_markdown_section(DOC, "Embedding store",
                                               "## Embedding store\n\nfresh\n")
  assert text.endswith("## Embedding store\n\nfresh\n")
  assert "old data" in text


def test_append_missing_section():
  text = benchmarking.replace_markdown_section(DOC, "Training", "## Training\n\nrate\n")
  assert text.endswith("old store\n\n## Training\n\nrate\n")


def test_empty_text_gets_heading():
  text = benchmarking.replace_markdown_section("", "Training", "## Training\n\nrate\n")
  assert text.startswith("# Benchmarks\n")
  assert text.endswith("## Training\n\nrate\n")


def test_update_docs_section_writes_file(tmp_path):
  path = tmp_path / "docs" / "benchmarks.md"
  benchmarking.update_docs_section(path, "Training", "## Training\n\nrate\n")
  benchmarking.update_docs_section(path, "Training", "## Training\n\nrate 2\n")
  text = path.read_text()
  assert text.count("## Training") == 1
  assert "rate 2" in text


def test_machine_info_fields():
  info = benchmarking.machine_info()
  assert info["cores"] >= 1
  assert info["cpu"]
  assert benchmarking.describe_machine(info).endswith(f"({info['machine']})")
