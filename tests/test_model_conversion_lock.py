"""Processes that start together on an empty model cache (replicas and a worker sharing a volume) convert the
bundled GGUF once: the first holds a file lock, the others wait and load its folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(message)s")
from prompt_store.embedded_model import ensure_smollm2
print(ensure_smollm2(__import__("pathlib").Path(sys.argv[1])))
"""


@pytest.mark.timeout(600)
def test_concurrent_starts_convert_the_model_once(tmp_path: Path) -> None:
    target = tmp_path / "cache" / "smollm2"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SCRIPT, str(target)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=580)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert sum("converting the bundled" in out for out in outputs) == 1, outputs
    assert all(out.strip().endswith(str(target)) for out in outputs)
    assert not [p for p in target.parent.iterdir() if ".tmp-" in p.name]  # no half-written copies left
