"""Collect every benchmark's goals from bench/results/*.json into one table (bench/results/summary.md).

With --readme, the table also replaces the block between the summary markers in README.md, so the README's
Performance section always shows the latest run. `make bench` runs it last.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
START, END = "<!-- bench-summary:start -->", "<!-- bench-summary:end -->"
ORDER = (
    "serve_smoke",
    "vs_peft",
    "prefix_ttft",
    "hot_swap",
    "scale_tasks",
    "gist",
    "http_load",
    "shared_prefix",
    "methods",
)


def load_results(folder: Path) -> list[dict]:
    found = {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json") if p.stem != "summary"}
    names = [n for n in ORDER if n in found] + sorted(n for n in found if n not in ORDER)
    return [found[n] for n in names if "goals" in found[n]]


def render(results: list[dict]) -> str:
    lines = [
        "| benchmark | measure | goal | measured | met |",
        "|---|---|---|---|---|",
    ]
    for res in results:
        name = f"[{res['name']}](bench/results/{res['name']}.md)"
        for g in res["goals"]:
            met = "yes" if g["met"] else "**NO**"
            lines.append(f"| {name} | {g['measure']} | {g['target']} | {g['measured']} | {met} |")
    runs = ", ".join(
        f"{r['name']} {r['written']}" + (f" ({r['elapsed_s'] / 60:.1f} min)" if "elapsed_s" in r else "")
        for r in results
    )
    missed = sum(not g["met"] for r in results for g in r["goals"])
    total = sum(len(r["goals"]) for r in results)
    lines += ["", f"{total - missed} of {total} goals met. Runs: {runs}."]
    return "\n".join(lines) + "\n"


def replace_block(text: str, table: str) -> str:
    if START not in text or END not in text:
        raise SystemExit(f"README.md has no {START} ... {END} block to replace")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table}{END}{tail}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", action="store_true", help="also update the table in README.md")
    args = parser.parse_args()
    results = load_results(RESULTS)
    if not results:
        sys.exit(f"no benchmark results in {RESULTS}: run `make bench` first")
    table = render(results)
    print(table)
    (RESULTS / "summary.md").write_text("# benchmark summary\n\n" + table)
    print(f"wrote {RESULTS / 'summary.md'}")
    if args.readme:
        readme = ROOT / "README.md"
        readme.write_text(replace_block(readme.read_text(), table))
        print(f"updated {readme}")


if __name__ == "__main__":
    main()
