"""Task changes behind the routes: upload, compress, rollback and delete, each run in a worker thread.

An upload is validated for this model (shape, fit, context, fingerprint) before the store takes it; the
store then checks the bytes in their stored form. After a new version is current, old versions beyond
SOFTSERVE_KEEP_VERSIONS are pruned, except those a running request here still holds. A rollback is a new
version with the old content (see server/routes/rollback.py), stored exactly like an upload.
"""

from __future__ import annotations

import logging

from prompt_store import Artifact, StoreError, check_servable, validate_artifact
from prompt_store.backends import ChangeEvent, Store, TaskInfo
from prompt_store.errors import NotFound, ValidationError
from runtime.gist import COMPRESSOR_METHOD, compress
from server.errors import BadRequest
from server.schemas import CompressRequest
from server.state import ServerState
from server.uploads import Files, parse_upload
from server.warmup import warm_task

log = logging.getLogger("softserve.tasks")

SHA_SHOWN = 12  # sha256 characters in log lines
WARM_WAIT_S = 5.0  # an upload waits at most this long for the engine to build the new prefix


def store_upload(state: ServerState, task_id: str, files: Files) -> TaskInfo:
    """The uploaded files (one artifact, or a PEFT adapter) -> a new current version of `task_id`."""
    max_bytes = state.settings.max_body_bytes
    artifact = parse_upload(files, task_id, state.runner.fingerprint, state.limits, max_bytes)
    return store_artifact(state, artifact)


def store_artifact(state: ServerState, artifact: Artifact, action: str = "upload") -> TaskInfo:
    """Store a new version (refused first if this model could never serve it), switch to it, prune."""
    check_servable(artifact, state.runner.fingerprint, state.runner.max_context)
    version = state.store.put(artifact)
    m = artifact.manifest  # what was stored, never any prompt or instruction text
    log.info(
        "%s: task=%s version=%d method=%s bytes=%d sha256=%s",
        action,
        artifact.task_id,
        version,
        m.method,
        artifact.nbytes(),
        m.sha256[:SHA_SHOWN],
    )
    # This replica switches at once; others follow through the store's watch().
    state.cache.apply(ChangeEvent(task_id=artifact.task_id, version=version, sha256=artifact.sha256))
    # acknowledged once servable: the new version's first request costs what a warm one does
    warm_task(state.cache, state.engine, artifact.task_id, wait_s=WARM_WAIT_S)
    state.metrics.uploads.labels(method=artifact.manifest.method).inc()
    prune(state, artifact.task_id)
    return stored_info(state, artifact, version)


def prune(state: ServerState, task_id: str) -> None:
    """Keep SOFTSERVE_KEEP_VERSIONS versions plus those a running request here holds (a failure only logs:
    the upload itself succeeded)."""
    try:
        state.store.prune(task_id, state.settings.keep_versions, state.cache.pinned_versions(task_id))
    except StoreError as exc:
        log.warning("pruning old versions of %r failed: %s", task_id, exc)


def stored_info(state: ServerState, artifact: Artifact, version: int) -> TaskInfo:
    """What this put stored (not whatever is current by now: another put or a DELETE may have followed),
    with the versions the task holds now (empty when a DELETE came right after this put)."""
    try:
        versions = state.store.info(artifact.task_id).versions
    except StoreError:
        versions = ()
    m = artifact.manifest
    return TaskInfo(artifact.task_id, version, m.method, m.sha256, m.created_at, versions, m.input_format)


def compress_and_store(state: ServerState, task_id: str, body: CompressRequest) -> TaskInfo:
    """Compress `body.instruction` with the stored gist embeddings or compressor into a new version of
    `task_id`."""
    source = compress_source(state, body)
    artifact = compress(state.runner, source, body.instruction, task_id, keep=body.keep_instruction)
    return store_artifact(state, artifact, action="compress")


def compress_source(state: ServerState, body: CompressRequest) -> Artifact:
    """The stored artifact a compress runs with: `gist_task` (gist embeddings) or `compressor` (a
    gist_compressor, refused unless it was trained on this base model)."""
    if (body.compressor is None) == (body.gist_task is None):
        raise BadRequest("give exactly one of gist_task and compressor", field="compressor")
    if body.compressor is None:
        gists = state.store.get(str(body.gist_task))
        validate_artifact(gists, state.runner.fingerprint, state.limits)
        return gists
    try:
        artifact = state.store.get(body.compressor)
    except NotFound:
        raise NotFound(f"compressor {body.compressor!r} is not a stored task", field="compressor") from None
    if artifact.manifest.method != COMPRESSOR_METHOD:
        raise ValidationError(
            f"compressor {body.compressor!r} is a {artifact.manifest.method!r} artifact, "
            f"not {COMPRESSOR_METHOD}",
            field="compressor",
        )
    try:
        validate_artifact(artifact, state.runner.fingerprint, state.limits)
    except ValidationError as exc:
        raise ValidationError(f"compressor {body.compressor!r}: {exc.message}", field="compressor") from exc
    return artifact


def previous_content(store: Store, info: TaskInfo) -> int:
    """The default rollback target (see server/routes/rollback.py); BadRequest when there is none."""
    shas = {v: store.get(info.task_id, v).sha256 for v in info.versions if v != info.version}
    first = min([v for v, sha in shas.items() if sha == info.sha256], default=info.version)
    older = [v for v, sha in shas.items() if v < first and sha != info.sha256]
    if not older:
        raise BadRequest(
            f"task {info.task_id!r} holds no older content than its current version {info.version} "
            f"(versions held: {', '.join(str(v) for v in info.versions)})",
            field="version",
        )
    return max(older)


def target_version(store: Store, info: TaskInfo, requested: int | None) -> int:
    if requested is None:
        return previous_content(store, info)
    if requested == info.version:
        raise BadRequest(f"version {requested} of {info.task_id!r} is already current", field="version")
    if requested not in info.versions:
        held = ", ".join(str(v) for v in info.versions)
        raise NotFound(f"task {info.task_id!r} has no version {requested} (versions held: {held})")
    return requested


def roll_back(state: ServerState, task_id: str, requested: int | None) -> tuple[TaskInfo, int]:
    """Put version `requested` (default: the content before) again as a new version; (new info, restored)."""
    version = target_version(state.store, state.store.info(task_id), requested)
    artifact = state.store.get(task_id, version)
    return store_artifact(state, artifact, action=f"rollback to {version}"), version


def delete_task(state: ServerState, task_id: str) -> None:
    """Delete every version of `task_id`; this replica stops serving it at once, others via watch()."""
    try:
        current: TaskInfo | None = state.store.info(task_id)  # for the log line only
    except StoreError:
        current = None
    state.store.delete(task_id)
    version, method, sha = (current.version, current.method, current.sha256) if current else (0, "?", "")
    log.info(
        "delete: task=%s version=%d method=%s sha256=%s (every version)",
        task_id,
        version,
        method,
        sha[:SHA_SHOWN],
    )
    state.cache.apply(ChangeEvent(task_id=task_id, version=0))
    state.metrics.forget_task(task_id)  # its metric series go with it
