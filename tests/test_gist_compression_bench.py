"""bench/gist_compression.py end to end (--quick) on a tiny Llama with the byte-level test tokenizer."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from conftest import tiny_llama
from tiny_tokenizer import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def test_quick_run_scores_every_condition_and_states_the_verdict(tmp_path: Path) -> None:
    from bench import gist_compression

    model_dir = tmp_path / "tiny"
    tiny_llama(vocab_size=259).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "results"
    assert gist_compression.main(["--quick", "--model", str(model_dir), "--out-dir", str(out)]) == 0
    payload = json.loads((out / "gist_compression-quick.json").read_text())
    rows = payload["data"]["rows"]
    conds = {r["condition"] for r in rows}
    assert conds == {
        "no instruction",
        "full instruction",
        "gist k=1",
        "gist k=4",
        "swapped gist k=1",
        "swapped gist k=4",
    }
    assert {r["split"] for r in rows} == {"held-out task", "held-out paraphrase"}
    held = {r["task"] for r in rows if r["split"] == "held-out task"}
    assert held == set(payload["data"]["held_out"]) and len(payload["data"]["tasks"]) >= 15
    assert all(0.0 <= v <= 1.0 for r in rows for v in r["rouge_l"]) and all(
        v <= 0 for r in rows for v in r["loglik"]
    )
    assert len(payload["goals"]) == 6  # per k: ROUGE-L and log-lik gap closed, swapped gist
    md = (out / "gist_compression-quick.md").read_text()
    assert "| gist k=4 |" in md and "The goal is NOT met (quick run)" in md and "not show compression" in md
    assert (out / "gist_compression-quick.png").stat().st_size > 0


def test_a_run_that_scored_one_split_still_reports(tmp_path: Path) -> None:
    """A run whose --max-evals stopped before the held-out paraphrases (only held-out task rows) reports what
    was scored instead of failing after the whole run; the run's data is on disk before the report."""
    from bench import gist_compression

    model_dir = tmp_path / "tiny"
    tiny_llama(vocab_size=259).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "results"
    assert gist_compression.main(["--quick", "--model", str(model_dir), "--out-dir", str(out)]) == 0
    data = json.loads((out / "gist_compression-quick.json").read_text())["data"]
    data["rows"] = [r for r in data["rows"] if r["split"] == "held-out task"]
    one_split = tmp_path / "one_split.json"
    one_split.write_text(json.dumps({"data": data}))
    redrawn = tmp_path / "redrawn"
    assert gist_compression.main(["--from-json", str(one_split), "--out-dir", str(redrawn)]) == 0
    md = (redrawn / "gist_compression.md").read_text()
    assert "## held-out tasks" in md and "## held-out paraphrases" not in md
