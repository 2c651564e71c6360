"""bench/gpu_check.py on CPU float32 (exact mode) with tiny sizes; its full-recompute reference vs HF's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from engine_refs import ref_input_ids, ref_inputs_embeds, ref_kv_prefix

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check  # noqa: E402

METHODS = {"bare", "prompt_tuning", "p_tuning", "prefix_tuning", "gist", "accept"}


def test_gpu_check_runs_exact_on_cpu(tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--dtype", "float32"]
    cmd += ["--models", "tiny", "--new-tokens", "4", "--batch", "2", "--tokens", "3", "--repeats", "1"]
    out = subprocess.run([*cmd, "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["data"]["exact"] is True and [g["met"] for g in report["goals"]] == [True]
    (result,) = report["data"]["results"]
    assert {c["method"] for c in result["cases"]} == METHODS
    for case in result["cases"]:  # exact: no divergence anywhere, zero log-prob gap
        assert case["mixed_vs_alone"] == case["mixed_vs_ref"] == case["alone_vs_ref"] == 4, case
        assert case["gap_mixed"] == case["gap_alone"] == 0.0, case
    assert result["throughput"]["mixed"] > 0 and result["throughput"]["hf"] > 0
    assert "| accept-short | accept | 4 | 4 | 4 |" in (tmp_path / "gpu_check.md").read_text()


def test_full_recompute_reference_matches_the_hf_references() -> None:
    """The check's reference (no KV reuse) agrees with engine_refs' cached ones, and flags a wrong token."""
    _, ref = gpu_check.runners("tiny", torch.device("cpu"), torch.float32)
    model, n = ref.model, 5
    for case in gpu_check.core_cases(ref):
        p = case.prompt
        if p is None:
            expected = ref_input_ids(model, case.ids, n)
        elif p.keys is not None:
            expected = ref_kv_prefix(model, p, case.ids, n)
        else:
            expected = ref_inputs_embeds(model, case.ids, n, p.embeds, p.added)
        tokens = gpu_check.reference_tokens(ref, case, n)
        assert tokens == expected, case.name
        assert gpu_check.max_gap(ref, case, tokens) == 0.0
        wrong = tokens[:2] + [(tokens[2] + 1) % 1000] + tokens[3:]
        assert gpu_check.max_gap(ref, case, wrong) > 0.0, case.name
