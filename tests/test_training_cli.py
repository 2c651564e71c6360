"""Training data, metrics, recipes, model-cache resolution, accelerate, and the softserve-train CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from tiny_tokenizer import tiny_tokenizer

from prompt_store import Fingerprint, load, validate_artifact
from training import cli
from training.data import Formatter, Record, collate, load_jsonl, split, tokenize
from training.eval import rouge_l, score
from training.loop import TrainConfig, train
from training.methods import build, config_for
from training.model import COMPLETE_MARKER, default_cache_dir, ensure_smollm2
from training.recipes.make_recipes import RECIPES, generate, recipe_path


def test_chat_tokenisation_matches_the_server_and_labels_only_the_answer() -> None:
    tok = tiny_tokenizer()
    ex = tokenize([Record("hello", "yes")], tok)[0]
    server = tok.apply_chat_template(
        [{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True
    )
    assert list(ex.prompt_ids) == tok(server, add_special_tokens=False)["input_ids"]
    assert tok.decode(list(ex.target_ids)) == "yes</s>"
    batch = collate([ex, tokenize([Record("a", "no")], tok)[0]], pad_id=0)
    assert batch.labels[0].tolist() == [-100] * len(ex.prompt_ids) + list(ex.target_ids)
    assert batch.attention_mask[1].sum() < batch.attention_mask[0].sum() and batch.labels[1, -1] == -100


def test_plain_tokenisation_without_a_chat_template() -> None:
    tok = tiny_tokenizer()
    ex = tokenize([Record("2+2=", "4")], tok, chat=False)[0]
    assert list(ex.prompt_ids) == tok("2+2=")["input_ids"]
    assert list(ex.target_ids) == tok("4", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert Formatter(tok).with_instruction("Add.", "2+2=") == "Add.\n\n2+2="


def test_jsonl_loading_and_a_deterministic_split(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(
        "".join(json.dumps({"input": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(20)) + "\n"
    )
    recs = load_jsonl(path)
    train_a, eval_a = split(recs, 0.2, seed=3)
    train_b, eval_b = split(recs, 0.2, seed=3)
    assert (train_a, eval_a) == (train_b, eval_b) and len(eval_a) == 4
    assert sorted(r.input for r in train_a + eval_a) == sorted(r.input for r in recs)
    path.write_text('{"input": "x"}\n')
    with pytest.raises(ValueError, match=":1:"):
        load_jsonl(path)


def test_rouge_l_and_exact_match() -> None:
    assert rouge_l("the cat sat", "the cat sat") == 1.0
    assert rouge_l("a b c d", "a c d e") == pytest.approx(0.75)
    assert rouge_l("", "x") == 0.0 and rouge_l("x y", "z") == 0.0
    res = score(["yes", " no ", "maybe"], ["yes", "no", "no"])
    assert res.exact_match == pytest.approx(2 / 3) and res.n == 3


def test_recipes_are_deterministic_and_shipped() -> None:
    for name in RECIPES:
        rows = generate(name)
        shipped = [json.loads(line) for line in recipe_path(name).read_text().splitlines()]
        assert rows == shipped and len(rows) == 300
        assert len({r["input"] for r in rows}) == 300 and all(r["instruction"] for r in rows)


def test_method_options_are_checked() -> None:
    assert config_for("p_tuning", encoder_type="lstm").encoder_type == "lstm"
    with pytest.raises(ValueError, match="does not take"):
        config_for("prompt_tuning", encoder_type="lstm")
    with pytest.raises(ValueError, match="unknown method"):
        config_for("lora")


def test_model_cache_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOFTSERVE_MODEL_CACHE", str(tmp_path / "m"))
    assert default_cache_dir() == tmp_path / "m"
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / COMPLETE_MARKER).write_text("x")
    assert ensure_smollm2() == tmp_path / "m"  # a complete cache is used as is, nothing is converted


def test_accelerate_single_process_matches_the_plain_loop() -> None:
    model, tok = tiny_llama(vocab_size=259).requires_grad_(False), tiny_tokenizer()
    examples = tokenize([Record(f"n{i}", "yes" if i % 2 else "no") for i in range(8)], tok)
    runs = []
    for use in (False, True):
        cfg = TrainConfig(steps=3, batch_size=4, lr=5e-2, progress=False, use_accelerate=use)
        runs.append(
            train(build("prompt_tuning", model, tok, num_virtual_tokens=2), model, examples, cfg).losses
        )
    assert runs[0] == pytest.approx(runs[1], abs=1e-6)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-model")
    tiny_llama(vocab_size=259).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _jsonl(path: Path) -> Path:
    instruction = "Say yes for odd numbers."
    rows = [
        {"instruction": instruction, "input": f"n{i}", "output": "yes" if i % 2 else "no"} for i in range(20)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_train_eval_compress_push(model_dir: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    data = _jsonl(tmp_path / "toy.jsonl")
    common = ["--model", str(model_dir), "--data", str(data), "--max-new-tokens", "3"]
    fast = ["--steps", "3", "--batch-size", "4", "--no-progress", "--num-virtual-tokens", "2"]
    assert (
        cli.main(
            ["train", "--method", "prefix_tuning", "--out", str(tmp_path / "pt"), "--eval", *common, *fast]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "prefix_tuning" and out["task_id"] == "toy" and {"before", "after"} <= set(out)
    for name in ("artifact.safetensors", "log.json", "loss.png", "eval.json", "checkpoint/state.json"):
        assert (tmp_path / "pt" / name).is_file(), name

    assert cli.main(["eval", "--artifact", str(tmp_path / "pt" / "artifact.safetensors"), *common]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"before", "after"}

    gist = ["train", "--method", "gist", "--out", str(tmp_path / "g"), "--steps", "2", "--batch-size", "4"]
    assert cli.main([*gist, "--no-progress", "--num-gist-tokens", "2", *common]) == 0
    capsys.readouterr()
    embeddings = tmp_path / "g" / "artifact.safetensors"
    assert cli.main(["eval", "--artifact", str(embeddings), *common]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"gist", "positive_control", "negative_control"}
    args = ["--gist-embeddings", str(embeddings), "--instruction", "Say yes.", "--task-id", "yes-task"]
    assert (
        cli.main(["compress", *args, "--out", str(tmp_path / "yes.safetensors"), "--model", str(model_dir)])
        == 0
    )
    gist_art = load(tmp_path / "yes.safetensors")
    fp = Fingerprint.from_model(tiny_llama(vocab_size=259), "x")
    validate_artifact(gist_art, fp)
    assert gist_art.manifest.method == "gist" and gist_art.tensors["keys"].shape == (2, 2, 2, 16)

    assert cli.main(["push", str(tmp_path / "yes.safetensors"), "--store", str(tmp_path / "store")]) == 0
    from prompt_store.backends import open_store

    assert torch.equal(
        open_store(str(tmp_path / "store")).get("yes-task").tensors["keys"], gist_art.tensors["keys"]
    )

    # pushing to a server: tests/test_cli.py, against a live one


DDP_SCRIPT = """
import json, os, pathlib, torch
from conftest import tiny_llama
from tiny_tokenizer import tiny_tokenizer
from training.data import Record, tokenize
from training.loop import TrainConfig, train
from training.methods import build
torch.set_num_threads(1)
model, tok = tiny_llama(vocab_size=259).requires_grad_(False), tiny_tokenizer()
ex = tokenize([Record(f"n{i}", "yes" if i % 2 else "nop") for i in range(16)], tok)
method = build("prefix_tuning", model, tok, num_virtual_tokens=2, projection_hidden_size=16)
world = int(os.environ.get("WORLD_SIZE", "1"))
cfg = TrainConfig(steps=3, batch_size=4 // world, lr=5e-2, progress=False, use_accelerate=world > 1)
losses = train(method, model, ex, cfg).losses
keys = method.keys_values()[0].sum().item()
# One file per rank: two ranks printing to one shared stdout pipe can interleave their lines.
rank = os.environ.get("RANK", "0")
out_dir = pathlib.Path(os.environ["RESULT_DIR"])
out_dir.mkdir(parents=True, exist_ok=True)
(out_dir / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "losses": losses, "keys": keys}))
"""


def test_two_cpu_ranks_through_accelerate_match_one_process(tmp_path: Path) -> None:
    """Equal-length answers, so the mean of the two ranks' losses is the one-process batch loss."""
    import os
    import subprocess
    import sys

    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}:{root / 'tests'}", "OMP_NUM_THREADS": "1"}
    runs = {}
    for cmd in (
        [sys.executable, str(script)],
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)],
    ):
        result_dir = tmp_path / f"results{len(cmd)}"
        run_env = {**env, "RESULT_DIR": str(result_dir)}
        subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=120, check=True)
        runs[len(cmd)] = [json.loads(f.read_text()) for f in sorted(result_dir.glob("rank*.json"))]
    (single,), ranks = runs[2], runs[6]
    assert len(ranks) == 2 and ranks[0]["keys"] == ranks[1]["keys"]
    assert ranks[0]["losses"] == pytest.approx(single["losses"], abs=1e-5)
    assert ranks[0]["keys"] == pytest.approx(single["keys"], abs=1e-3)


def test_one_list_of_method_options_for_the_cli_the_jobs_api_and_the_trainers() -> None:
    """prompt_store.methods.TRAINING_OPTIONS is the one list: every name is a `train` flag, a fine-tuning
    job hyperparameter and a field of at least one trainer's config."""
    import dataclasses

    from jobs import records
    from prompt_store.methods import TRAINING_OPTIONS
    from server.routes.fine_tuning import Hyperparameters
    from training.methods import METHODS

    assert cli.METHOD_OPTIONS is records.METHOD_HYPERPARAMETERS is TRAINING_OPTIONS
    args = cli.build_parser().parse_args(["train", "--method", "accept", "--data", "x.jsonl"])
    fields = {f.name for _, cfg in METHODS.values() for f in dataclasses.fields(cfg)}
    for name in TRAINING_OPTIONS:
        assert hasattr(args, name) and name in Hyperparameters.model_fields and name in fields, name


def test_cli_trains_a_gist_compressor_that_compress_then_uses(
    model_dir: Path, tmp_path: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    data = _jsonl(tmp_path / "odd.jsonl")
    out = tmp_path / "comp"
    fast = [
        "--steps",
        "2",
        "--num-gist-tokens",
        "2",
        "--rank",
        "2",
        "--no-progress",
        "--model",
        str(model_dir),
    ]
    assert cli.main(["compressor", "--data", str(data), "--no-templated", "--out", str(out), *fast]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "gist_compressor" and summary["tasks"] == 1
    for name in ("artifact.safetensors", "log.json", "loss.png"):
        assert (out / name).is_file(), name
    assert len(json.loads((out / "log.json").read_text())["losses"]) == 2
    comp = load(out / "artifact.safetensors")
    assert comp.manifest.method_config["num_gist_tokens"] == 2 and comp.manifest.method_config["rank"] == 2

    target = tmp_path / "odd-gist.safetensors"
    args = [
        "--gist-embeddings",
        str(out / "artifact.safetensors"),
        "--instruction",
        "Say yes for odd numbers.",
    ]
    assert (
        cli.main(["compress", *args, "--task-id", "odd", "--out", str(target), "--model", str(model_dir)])
        == 0
    )
    gist = load(target)
    assert gist.manifest.method == "gist" and gist.tensors["keys"].shape == (2, 2, 2, 16)
    assert gist.manifest.notes.startswith("compressed by gist-compressor")


def test_cli_compressor_and_system_prompt_refusals_are_one_line(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"input": "x", "output": "y"}) + "\n")
    assert cli.main(["compressor", "--data", str(bad), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert "bad.jsonl" in err and "instruction" in err and len(err.splitlines()) == 1
    assert cli.main(["compressor", "--no-templated", "--out", str(tmp_path / "c")]) == 2
    assert "--no-templated" in capsys.readouterr().err
    assert cli.main(["compressor", "--steps", "0", "--out", str(tmp_path / "c")]) == 2
    assert "--steps" in capsys.readouterr().err
    train = ["train", "--method", "prompt_tuning", "--data", str(bad), "--chat", "off"]
    assert cli.main([*train, "--system-prompt", "Be brief."]) == 2
    assert "--system-prompt" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
