"""bench/results/docker_e2e.md/.json from a `make docker-e2e` run: run.sh's phases (phases.tsv: name, seconds,
ok|FAILED), the stack steps (steps.jsonl, docker/e2e/e2e.py) and the image sizes (images.tsv: tag, bytes)."""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def read_tsv(path: Path) -> list[list[str]]:
    if not path.exists():
        return []
    return [line.split("\t") for line in path.read_text().splitlines() if line.strip()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/docker_e2e")
    p.add_argument("--status", default="unknown", help="pass | fail (run.sh's exit)")
    args = p.parse_args()
    phases = [
        {"phase": n, "seconds": float(s), "ok": ok == "ok"}
        for n, s, ok, *_ in read_tsv(args.work / "phases.tsv")
    ]
    steps_file = args.work / "steps.jsonl"
    steps = [json.loads(line) for line in steps_file.read_text().splitlines()] if steps_file.exists() else []
    images = [{"image": t, "bytes": int(b)} for t, b in read_tsv(args.work / "images.tsv")]
    info = dict(read_tsv(args.work / "info.tsv"))  # type: ignore[arg-type]
    result: dict[str, Any] = {
        "status": args.status,
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": f"{platform.machine()}, {Path('/proc/cpuinfo').read_text().count('processor')} CPUs",
        "info": info,
        "phases": phases,
        "steps": steps,
        "images": images,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        "# make docker-e2e",
        "",
        f"Status: **{args.status}** ({result['finished_utc']}, {result['host']}). "
        + ", ".join(f"{k}: {v}" for k, v in info.items()),
        "",
        "| phase / step | result | seconds | detail |",
        "|---|---|---:|---|",
    ]
    for ph in phases:
        md.append(f"| {ph['phase']} | {'ok' if ph['ok'] else 'FAILED'} | {ph['seconds']:.1f} | |")
    for st in steps:
        detail = json.dumps(st["detail"])
        detail = (detail[:300] + "…") if len(detail) > 300 else detail
        md.append(
            f"| stack: {st['step']} | {'ok' if st['ok'] else 'FAILED'} | {st['seconds']:.1f} | `{detail}` |"
        )
    md += ["", "| image | size (MB) |", "|---|---:|"]
    md += [f"| {im['image']} | {im['bytes'] / 1e6:.0f} |" for im in images]
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"wrote {args.out}.md/.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
