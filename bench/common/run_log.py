"""What the long training benchmarks (methods, methods_real) print as they go, and their time budget."""

from __future__ import annotations

import time


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def over_budget(t0: float, budget_min: float, skipped: list[str], what: str) -> bool:
    """True, with `what` noted in `skipped`, once budget_min minutes have passed since t0 (monotonic)."""
    if time.monotonic() - t0 < budget_min * 60:
        return False
    skipped.append(what)
    log(f"skipping {what}: over the {budget_min:.0f} min budget")
    return True
