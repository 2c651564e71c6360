"""`softserve-train`: train soft-prompt artifacts, evaluate them, compress gist instructions, push them.

examples:
  softserve-train train --method prompt_tuning --data training/recipes/sentiment.jsonl --eval
  softserve-train eval --artifact runs/sentiment-prompt_tuning/artifact.safetensors \\
      --data training/recipes/sentiment.jsonl
  softserve-train train --method gist --steps 300 \\
      --data training/recipes/sentiment.jsonl --data training/recipes/dates.jsonl
  softserve-train compress --gist-embeddings runs/gist-embeddings-gist/artifact.safetensors \\
      --instruction "Label the review: positive or negative." --task-id sentiment-gist --out gist.safetensors
  softserve-train compressor --data my_task.jsonl --steps 200
  softserve-train push gist.safetensors --url http://127.0.0.1:8000 --key KEY
  softserve-train push gist.safetensors --store ~/.softserve/store
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from prompt_store import Artifact, StoreError, load, make_artifact, save, to_bytes
from prompt_store.methods.options import TRAINING_OPTIONS
from prompt_store.types import SUPPORTED_DTYPES
from softserve_client import (
    EXIT_REFUSED,
    EXIT_USAGE,
    CliError,
    Connection,
    TaskClient,
    add_client_flags,
    check_url,
    connection,
    fail,
    given_client_flags,
    pushed_line,
    report,
    version,
    wants_json,
)
from training import compressor_cli
from training.methods import METHODS

METHOD_OPTIONS = TRAINING_OPTIONS  # the artifact contract's one list (prompt_store.methods)


def _chat(value: str) -> bool | None:
    return {"auto": None, "on": True, "off": False}[value]


def _text_arg(value: str | None) -> str | None:
    """A text option's value, or the contents of FILE for `@FILE`."""
    if value is None or not value.startswith("@"):
        return value
    return Path(value[1:]).read_text()


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model", default="smollm2", help="HF name or path; 'smollm2' = embedded default (%(default)s)"
    )
    g.add_argument(
        "--dtype",
        default="float32",
        choices=["auto", *sorted(SUPPORTED_DTYPES)],
        help="base model dtype; auto = bfloat16 on CUDA, float32 on CPU (%(default)s)",
    )
    g.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")


def _add_data_args(p: argparse.ArgumentParser, multiple: bool) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        required=True,
        action="append" if multiple else "store",
        help='JSONL of {"input","output"'
        '[,"instruction"]}' + (" (repeat to mix tasks, e.g. for gist)" if multiple else ""),
    )
    g.add_argument("--eval-fraction", type=float, default=0.1, help="held-out share per file (%(default)s)")
    g.add_argument("--max-eval", type=int, default=None, help="cap on held-out examples per file")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the train/eval split (%(default)s)")
    g.add_argument(
        "--chat",
        choices=("auto", "on", "off"),
        default="auto",
        help="chat template: auto = train: when the tokenizer has one, eval: as the artifact records; "
        "off = raw text. An artifact records its format; the server formats a plain prompt the same way",
    )
    g.add_argument("--max-new-tokens", type=int, default=None, help="eval decode length (longest answer + 4)")


def _train_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train a method on a task and export its artifact",
        description="Train one soft-prompt method against the frozen base model. Writes "
        "OUT/artifact.safetensors, OUT/log.json, OUT/loss.png and OUT/checkpoint/.",
    )
    p.add_argument("--method", required=True, choices=sorted(METHODS), help="gist trains gist embeddings")
    p.add_argument("--task-id", default=None, help="artifact task id (default: data file name)")
    p.add_argument("--out", default=None, help="output folder (default: runs/<task-id>-<method>)")
    _add_model_args(p)
    _add_data_args(p, multiple=True)
    p.add_argument(
        "--system-prompt",
        default=None,
        help="chat only: the system message to train under (or @FILE); the artifact records it and the "
        "server applies it to a plain prompt (default: none, the template's own)",
    )
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=200, help="optimizer steps (%(default)s)")
    g.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch (%(default)s)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (%(default)s)")
    g.add_argument("--lr", type=float, default=3e-2, help="AdamW learning rate (%(default)s)")
    g.add_argument(
        "--warmup-steps", type=int, default=10, help="linear warmup, then linear decay (%(default)s)"
    )
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    g.add_argument("--seed", type=int, default=0, help="data order and initialisation seed")
    g.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints (0: end only)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint if present")
    g.add_argument(
        "--accelerate",
        action="store_true",
        help="data-parallel through accelerate: run under `torchrun --nproc_per_node N -m training.cli ...` "
        "(CPU ranks use gloo) or `accelerate launch` on GPUs with --device cuda",
    )
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    g.add_argument("--max-length", type=int, default=512, help="drop longer examples (tokens)")
    g.add_argument("--export-dtype", default="float32", choices=sorted(SUPPORTED_DTYPES))
    g.add_argument("--eval", action="store_true", help="evaluate on the held-out split afterwards")
    m = p.add_argument_group("method options (each method takes its own subset)")
    m.add_argument("--num-virtual-tokens", type=int, help="prompt length m (all but gist; default 8)")
    m.add_argument("--init", choices=("random", "vocab", "text"), help="prompt_tuning init (vocab)")
    m.add_argument("--init-text", help="prompt_tuning init='text' source")
    m.add_argument("--encoder-type", choices=("mlp", "lstm"), help="p_tuning encoder (mlp)")
    m.add_argument("--encoder-hidden-size", type=int, help="p_tuning encoder width (128)")
    m.add_argument(
        "--no-projection",
        dest="projection",
        action="store_const",
        const=False,
        help="prefix_tuning: train the keys/values directly, without the MLP",
    )
    m.add_argument("--projection-hidden-size", type=int, help="prefix_tuning MLP width (256)")
    m.add_argument("--num-subspaces", type=int, help="accept K (8; must divide the hidden size)")
    m.add_argument("--num-codewords", type=int, help="accept r (16)")
    m.add_argument("--added-length", type=int, help="accept SCAP length s (0 = no SCAP)")
    m.add_argument("--added-subspaces", type=int, help="accept SCAP subspaces (8)")
    m.add_argument("--added-codewords", type=int, help="accept SCAP codewords (8)")
    m.add_argument("--weight-lr", type=float, help="accept learning rate of the SCPP weights (default --lr)")
    m.add_argument("--codebook-lr", type=float, help="accept learning rate of the codebook (default --lr)")
    m.add_argument("--added-lr", type=float, help="accept learning rate of SCAP (default --lr / 60)")
    m.add_argument("--num-gist-tokens", type=int, help="gist k (2)")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from training.loop import TrainConfig
    from training.model import load_model
    from training.pipeline import TaskRunConfig, load_split, train_task

    if args.system_prompt is not None and args.chat == "off":
        raise CliError("--system-prompt: needs the chat template (not --chat off)", EXIT_USAGE)
    task_id = args.task_id or (
        "gist-embeddings" if args.method == "gist" else Path(args.data[0]).stem.lower()
    )
    out = Path(args.out or f"runs/{task_id}-{args.method}")
    cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        progress=not args.no_progress,
        use_accelerate=args.accelerate,
    )
    options = {k: getattr(args, k) for k in METHOD_OPTIONS}
    options["seed"] = args.seed
    lm = load_model(args.model, args.dtype, args.device)
    data = load_split(args.data, args.eval_fraction, args.split_seed, args.max_eval)
    run_cfg = TaskRunConfig(
        method_name=args.method,
        task_id=task_id,
        train_cfg=cfg,
        method_options=options,
        out_dir=out,
        resume=args.resume,
        chat=_chat(args.chat),
        system_prompt=_text_arg(args.system_prompt),
        max_length=args.max_length,
        export_dtype=SUPPORTED_DTYPES[args.export_dtype],
        run_eval=args.eval,
        max_new_tokens=args.max_new_tokens,
    )
    run = train_task(lm, data, run_cfg)
    if os.environ.get("RANK", "0") != "0":  # distributed run: rank 0 reports
        return 0
    summary: dict[str, Any] = {
        "artifact": str(run.artifact_path),
        "method": run.artifact.manifest.method,
        "task_id": task_id,
        "trainable_params": run.method.num_trainable(),
        "artifact_bytes": len(to_bytes(run.artifact)),
        "first_loss": run.result.losses[0] if run.result.losses else None,
        "last_loss": run.result.losses[-1] if run.result.losses else None,
    }
    summary |= {k: v.to_dict() | {"samples": v.samples[:2]} for k, v in run.evaluation.items()}
    print(json.dumps(summary, indent=1))
    return 0


def _eval_parser(sub: Any) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate an artifact on a held-out split (exact match, ROUGE-L)",
        description="Greedy-decode the held-out split through the artifact's serving form. "
        "gist_embedding artifacts: gist vs. positive/negative controls.",
    )
    p.add_argument("--artifact", required=True, help="artifact .safetensors")
    p.add_argument("--all", action="store_true", help="evaluate every record, not the held-out split")
    p.add_argument("--no-baseline", action="store_true", help="skip the no-prompt baseline")
    p.add_argument("--json", default=None, help="also write the results here")
    _add_model_args(p)
    _add_data_args(p, multiple=False)
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    from prompt_store import validate_artifact
    from training.data import load_jsonl
    from training.eval import evaluate_artifact
    from training.model import load_model
    from training.pipeline import load_split

    lm = load_model(args.model, args.dtype, args.device)
    artifact = load(args.artifact)
    validate_artifact(artifact, lm.fingerprint())
    records = (
        load_jsonl(args.data)
        if args.all
        else load_split([args.data], args.eval_fraction, args.split_seed, args.max_eval).eval
    )
    results = evaluate_artifact(
        lm.model,
        lm.tokenizer,
        artifact,
        records,
        baseline=not args.no_baseline,
        chat=_chat(args.chat),
        max_new_tokens=args.max_new_tokens,
        model_name=lm.name,
    )
    report = {k: v.to_dict() for k, v in results.items()}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


def _compress_parser(sub: Any) -> None:
    p = sub.add_parser(
        "compress",
        help="compress an instruction into a gist artifact",
        description="Run instruction + learned gist tokens once and keep the gists' keys/values "
        "(method `gist`, next_position = instruction tokens + k).",
    )
    p.add_argument(
        "--gist-embeddings",
        required=True,
        help="gist_embedding artifact (`train --method gist`) or gist_compressor artifact (`compressor`)",
    )
    p.add_argument("--instruction", required=True, help="instruction text (or @FILE to read it)")
    p.add_argument("--task-id", required=True)
    p.add_argument("--out", required=True, help="where to write the gist artifact")
    p.add_argument("--export-dtype", default="float32", choices=sorted(SUPPORTED_DTYPES))
    _add_model_args(p)
    p.set_defaults(func=_cmd_compress)


def _cmd_compress(args: argparse.Namespace) -> int:
    from prompt_store import validate_artifact
    from training.methods import compress
    from training.model import load_model

    lm = load_model(args.model, args.dtype, args.device)
    embeddings = load(args.gist_embeddings)
    validate_artifact(embeddings, lm.fingerprint())
    text = _text_arg(args.instruction) or ""
    art = compress(
        lm.model,
        lm.tokenizer,
        embeddings,
        text,
        task_id=args.task_id,
        model_name=lm.name,
        dtype=SUPPORTED_DTYPES[args.export_dtype],
    )
    path = save(art, args.out)
    print(
        json.dumps(
            {"artifact": str(path), "task_id": args.task_id, "method_config": art.manifest.method_config}
        )
    )
    return 0


def _push_parser(sub: Any) -> None:
    p = sub.add_parser(
        "push",
        help="upload an artifact to a running server or write it into a store",
        description="Upload to a running server: PUT /tasks/{id} (the flags and environment of "
        "`softserve tasks push`). --store: put it directly into a disk path or redis:// URL instead.",
    )
    p.add_argument("artifact", help="artifact .safetensors")
    p.add_argument("--task-id", default=None, help="publish under this task id (default: the artifact's)")
    p.add_argument("--store", help="store spec: a directory, disk:PATH, or redis://... (instead of a server)")
    add_client_flags(p)
    p.set_defaults(func=_cmd_push)


def retarget(artifact: Artifact, task_id: str) -> Artifact:
    """The same tensors and config under another task id."""
    if task_id == artifact.task_id:
        return artifact
    m = artifact.manifest
    return make_artifact(
        task_id, m.method, m.method_config, artifact.tensors, m.base_model, m.notes, m.input_format
    )


def push_to_server(
    artifact: Artifact, url: str, api_key: str | None, timeout: float = 60.0
) -> dict[str, Any]:
    """PUT the artifact to /tasks/{task_id}; raises CliError (a RuntimeError) with the server's answer."""
    conn = Connection(check_url(url), api_key, timeout)
    with TaskClient(conn) as client:
        return client.push(artifact.task_id, [(f"{artifact.task_id}.safetensors", to_bytes(artifact))])


def push_to_store(artifact: Artifact, spec: str) -> int:
    """Write the artifact into a store (disk path or redis URL); returns the new version."""
    from prompt_store.backends import open_store

    store = open_store(spec)
    try:
        return store.put(artifact)
    finally:
        store.close()


def _load_artifact(path: str) -> Artifact:
    if not Path(path).is_file():
        raise CliError(f"{path}: no such file", EXIT_USAGE)
    try:
        return load(path)
    except (StoreError, OSError, ValueError) as exc:
        raise CliError(f"{path} is not a softserve artifact: {exc}", EXIT_USAGE) from exc


def _cmd_push(args: argparse.Namespace) -> int:
    if args.store and given_client_flags(args):
        raise CliError(
            f"--store writes to a store directly: {', '.join(given_client_flags(args))} do not apply"
        )
    conn = None if args.store else connection(args)  # a bad URL is refused before the file is read
    artifact = _load_artifact(args.artifact)
    if args.task_id:
        artifact = retarget(artifact, args.task_id)
    if args.store:
        try:
            version = push_to_store(artifact, args.store)
        except StoreError as exc:
            raise CliError(f"store {args.store!r} refused it: {exc}", EXIT_REFUSED) from exc
        result = {"task_id": artifact.task_id, "version": version, "store": args.store}
        report(args, result, f"stored {artifact.task_id!r} as version {version} in {args.store}")
        return 0
    assert conn is not None
    with TaskClient(conn) as client:
        info = client.push(artifact.task_id, [(f"{artifact.task_id}.safetensors", to_bytes(artifact))])
    report(args, info, pushed_line(info))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="softserve-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"softserve-train {version()}")
    add_client_flags(parser)  # for push; also accepted before the subcommand, as in `softserve`
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_train_parser, _eval_parser, _compress_parser, _push_parser):
        add(sub)
    compressor_cli.add_parser(sub, _add_model_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "push" and (given_client_flags(args) or wants_json(args)):
        flags = ", ".join(given_client_flags(args)) or "--json"
        parser.error(f"{flags}: for `push` only")
    try:
        return int(args.func(args))
    except CliError as exc:
        return fail("softserve-train", exc)
    except (ValueError, FileNotFoundError) as exc:
        return fail("softserve-train", CliError(str(exc), EXIT_USAGE))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
