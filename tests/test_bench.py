"""The benchmark plumbing: the summary table and README block, and every script's argument checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import summary  # noqa: E402

SCRIPTS = sorted(p.name for p in (ROOT / "bench").glob("*.py") if p.name not in {"harness.py", "summary.py"})


def _result(folder: Path, name: str, goals: list[dict]) -> None:
    payload = {"name": name, "written": "2026-01-01 00:00:00", "elapsed_s": 90.0, "goals": goals, "data": {}}
    (folder / f"{name}.json").write_text(json.dumps(payload))


def test_summary_orders_benchmarks_and_counts_missed_goals(tmp_path: Path) -> None:
    _result(tmp_path, "zeta_custom", [{"measure": "z", "target": "1", "measured": "1", "met": True}])
    _result(tmp_path, "vs_peft", [{"measure": "ratio", "target": ">= 3x", "measured": "2.5x", "met": False}])
    _result(
        tmp_path, "serve_smoke", [{"measure": "decode", "target": ">= 0.9", "measured": "1.01", "met": True}]
    )
    (tmp_path / "methods.json").write_text("[]")  # other formats are skipped, not fatal
    table = summary.render(summary.load_results(tmp_path))
    rows = [line for line in table.splitlines() if line.startswith("| [")]
    assert [r.split("]")[0] for r in rows] == ["| [serve_smoke", "| [vs_peft", "| [zeta_custom"]
    assert "| 2.5x | **NO** |" in rows[1]
    assert "2 of 3 goals met" in table and "(1.5 min)" in table


def test_readme_block_is_replaced_and_a_missing_block_is_an_error() -> None:
    text = f"intro\n{summary.START}\nold table\n{summary.END}\noutro\n"
    new = summary.replace_block(text, "| new |\n")
    assert new == f"intro\n{summary.START}\n| new |\n{summary.END}\noutro\n"
    assert summary.replace_block(new, "| newer |\n").count(summary.START) == 1
    with pytest.raises(SystemExit, match="no <!-- bench-summary:start -->"):
        summary.replace_block("no markers here", "| x |\n")


def test_readme_has_the_summary_block() -> None:
    text = (ROOT / "README.md").read_text()
    assert text.count(summary.START) == 1 and text.count(summary.END) == 1


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_benchmark_has_help_with_device(script: str) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "--device" in out.stdout
