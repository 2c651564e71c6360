"""Cost of one `sample_batch` call (server.sampling) for a mixed batch: greedy, top-p, top-k and plain seeded
rows, 1 CPU thread by default, process time. Prints µs per call; not part of `make bench` (no goal).

    .venv/bin/python bench/sampling_step.py --batch 64 --vocab 49152
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.requests import SamplingParams  # noqa: E402
from server.sampling import RowSampler, sample_batch  # noqa: E402


def mixed_params(batch: int, greedy: bool = False) -> list[SamplingParams]:
    """A quarter each: greedy, top-p 0.9, top-k 50, plain temperature; every sampled row seeded (or all
    greedy)."""
    if greedy:
        return [SamplingParams() for _ in range(batch)]
    kinds = [
        lambda s: SamplingParams(),
        lambda s: SamplingParams(temperature=0.8, top_p=0.9, seed=s),
        lambda s: SamplingParams(temperature=0.8, top_k=50, seed=s),
        lambda s: SamplingParams(temperature=1.0, seed=s),
    ]
    return [kinds[b % len(kinds)](b) for b in range(batch)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--greedy", action="store_true", help="every row greedy (else the mixed batch)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    params = mixed_params(args.batch, args.greedy)
    rows = [RowSampler.create(p, device, args.vocab) for p in params]
    gen = torch.Generator().manual_seed(0)
    steps = [
        (torch.randn(args.batch, args.vocab, generator=gen) * 4).to(device) for _ in range(4)
    ]  # [B, V] each
    for logits in steps:  # warm-up
        sample_batch(logits, rows)
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    start = clock()
    for i in range(args.iters):
        sample_batch(steps[i % len(steps)], rows)
    per_call = (clock() - start) / args.iters * 1e6
    print(
        f"sample_batch {'greedy' if args.greedy else 'mixed'} B={args.batch} V={args.vocab} "
        f"device={device.type} threads={args.threads}: "
        f"{per_call:.0f} µs per call ({per_call / args.batch:.1f} µs per row)"
    )


if __name__ == "__main__":
    main()
