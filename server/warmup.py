"""Load a task's new version ahead of its first request: artifact -> serving form -> device KV prefix.

After an upload (on this replica) or a change seen by the store watch (another replica's upload of a task in
use here), the first request on the new version would otherwise pay for the store read, the conversion and
the prefix forward. Warming moves that work off the request path.
"""

from __future__ import annotations

import logging
import threading

from prompt_store.cache import ServingCache
from prompt_store.errors import StoreError
from server.engine import Engine

log = logging.getLogger("softserve.warmup")


def warm_task(cache: ServingCache, engine: Engine, task_id: str, wait_s: float = 0.0) -> bool:
    """Have the engine build `task_id`'s current device prefix; wait up to `wait_s` for it (0: do not wait).

    Returns whether the prefix is ready (or was queued, without waiting). Failures only log: the first
    request then converts the task itself, and reports any error as its own.
    """
    if not engine.is_running():
        return False
    try:
        lease = cache.acquire(task_id)
    except StoreError as exc:
        log.info("warm-up of %r skipped: %s", task_id, exc)
        return False
    ready = threading.Event()
    outcome = [False]

    def done(ok: bool) -> None:
        outcome[0] = ok
        lease.release()
        ready.set()

    engine.warm(lease.task, done)
    if wait_s <= 0:
        return True
    return ready.wait(wait_s) and outcome[0]
