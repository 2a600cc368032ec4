"""The README stays true: its YAML reference is the code's, its commands and files exist."""

from __future__ import annotations

import re
from pathlib import Path

from metakd.cli import build_parser
from metakd.config import reference_markdown

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def code_lines() -> list[str]:
    """Lines of the README's shell code blocks (```bash or a bare fence)."""
    lines, fence = [], None
    for line in README.splitlines():
        if line.startswith("```"):
            fence = None if fence is not None else (line[3:].strip() or "bash")
        elif fence == "bash" and line.strip():
            lines.append(line.strip())
    return lines


def test_yaml_reference_is_generated_from_the_schema():
    block = README.split("<!-- reference:begin -->\n", 1)[1].split("\n<!-- reference:end -->", 1)[0]
    assert block == reference_markdown(), "regenerate with metakd.config.reference_markdown()"


def test_ci_runs_the_readme_test_command():
    assert "python -m pytest -q" in README
    assert "python -m pytest -q" in (ROOT / ".ci" / "run").read_text()


def test_metakd_commands_in_the_readme_exist():
    subcommands = set(build_parser()._subparsers._group_actions[0].choices)
    used = {m.group(1) for line in code_lines() for m in re.finditer(r"\bmetakd (\w+)", line)}
    assert {"sweep", "run", "validate", "results", "plot", "table"} <= used
    assert used <= subcommands, used - subcommands


def test_files_named_in_the_readme_exist():
    named = set(re.findall(r"\b((?:sweeps|benchmarks|cluster)/[\w./-]+\.(?:yaml|py|sh))\b", README))
    assert "sweeps/smoke.yaml" in named and "benchmarks/amazon_cpu.py" in named
    to_create = {n for n in named if f"to `{n}`" in README}  # "copy X to `Y`" instructions
    missing = sorted(n for n in named - to_create if not (ROOT / n).exists())
    assert not missing, missing
