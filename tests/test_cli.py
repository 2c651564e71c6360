"""The real `softserve` and `softserve-train` entry points against a live server (uvicorn in a thread).

One interface: --url/$SOFTSERVE_URL and --key/$SOFTSERVE_ADMIN_KEY, before or after the subcommand, on both
tools; human output by default, --json for scripts; every error one line on stderr and an exit code
(1 the server refused, 2 bad input here, 3 no answer), never a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from api_helpers import prompt_artifact_bytes
from conftest import free_port
from live_server import threaded_server

from prompt_store import from_bytes

ADMIN = "cli-test-admin-key-0123456789"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any, Path]]:
    """(URL, server state, a folder with artifacts v1.safetensors, v2.safetensors for this model)."""
    tmp = tmp_path_factory.mktemp("cli")
    with threaded_server(tmp, admin_key=ADMIN) as (url, state):
        for seed in (1, 2):
            data = prompt_artifact_bytes("from-file", state.runner.fingerprint, seed=seed)
            (tmp / f"v{seed}.safetensors").write_bytes(data)
        yield url, state, tmp


def run(tool: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The installed console script, with no SOFTSERVE_* from the test's own environment."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SOFTSERVE_")}
    done = subprocess.run(
        [str(BIN / tool), *args], capture_output=True, text=True, timeout=120, env={**clean, **env}
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done


def softserve(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return run("softserve", *args, **env)


def one_error_line(done: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert done.stdout == ""
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_version_flag() -> None:
    for tool in ("softserve", "softserve-train"):
        done = run(tool, "--version")
        assert done.returncode == 0 and done.stdout.strip() == f"{tool} 0.1.0", done


def test_flags_and_environment_before_or_after_the_subcommand(live) -> None:  # type: ignore[no-untyped-def]
    url, state, files = live
    v1 = str(files / "v1.safetensors")
    assert softserve("--url", url, "--key", ADMIN, "tasks", "push", "flags", v1).returncode == 0
    assert softserve("tasks", "--url", url, "--key", ADMIN, "push", "flags", v1).returncode == 0
    assert softserve("tasks", "push", "flags", v1, "--url", url, "--key", ADMIN).returncode == 0
    done = softserve("tasks", "push", "flags", v1, SOFTSERVE_URL=url, SOFTSERVE_ADMIN_KEY=ADMIN)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("pushed 'flags': version 4 is current (prompt_tuning, sha256 ")
    assert state.store.info("flags").versions[-1] == 4
    # a flag beats the environment: a wrong key in the environment, the right one as a flag
    done = softserve(
        "tasks", "delete", "flags", "--key", ADMIN, SOFTSERVE_URL=url, SOFTSERVE_ADMIN_KEY="x" * 20
    )
    assert done.returncode == 0, done.stderr


def test_train_push_shares_the_flags_and_environment(live) -> None:  # type: ignore[no-untyped-def]
    url, state, files = live
    v2 = str(files / "v2.safetensors")
    done = run(
        "softserve-train", "--url", url, "push", v2, "--task-id", "trained", "--api-key", ADMIN, "--json"
    )
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["task_id"] == "trained" and info["version"] == 1
    done = run(
        "softserve-train", "push", v2, "--task-id", "trained", SOFTSERVE_URL=url, SOFTSERVE_ADMIN_KEY=ADMIN
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("pushed 'trained': version 2 is current")
    sent = from_bytes((files / "v2.safetensors").read_bytes()).tensors["prompt"]
    assert state.store.info("trained").version == 2
    assert torch.equal(state.store.get("trained").tensors["prompt"], sent)
    one_error_line(run("softserve-train", "push", v2, SOFTSERVE_URL=url), 1, "401", "--key")  # no key


def test_list_is_a_table_and_json_for_scripts(live) -> None:  # type: ignore[no-untyped-def]
    url, _, files = live
    for _ in range(3):
        assert (
            softserve(
                "tasks", "push", "listed", str(files / "v1.safetensors"), "--url", url, "--key", ADMIN
            ).returncode
            == 0
        )
    table = softserve("tasks", "list", "--url", url)
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.strip().splitlines()
    assert header.split() == ["TASK", "VERSION", "METHOD", "VERSIONS", "SHA256", "CREATED"]
    row = next(r for r in rows if r.startswith("listed "))
    assert row.split()[:4] == ["listed", "3", "prompt_tuning", "1-3"]
    listed = json.loads(softserve("--json", "tasks", "list", "--url", url).stdout)
    entry = next(t for t in listed["tasks"] if t["task_id"] == "listed")
    assert entry["version"] == 3 and entry["versions"] == [1, 2, 3] and len(entry["sha256"]) == 64
    shown = softserve("tasks", "show", "listed", "--url", url)
    assert (
        shown.returncode == 0 and "version   3 (current)" in shown.stdout and "versions  1-3" in shown.stdout
    )


def test_delete_confirms_then_the_task_is_gone(live) -> None:  # type: ignore[no-untyped-def]
    url, state, files = live
    assert (
        softserve(
            "tasks", "push", "doomed", str(files / "v1.safetensors"), "--url", url, "--key", ADMIN
        ).returncode
        == 0
    )
    done = softserve("tasks", "delete", "doomed", "--url", url, "--key", ADMIN)
    assert done.returncode == 0 and done.stdout.strip() == "deleted 'doomed' and all its versions"
    as_json = softserve("tasks", "delete", "doomed", "--url", url, "--key", ADMIN, "--json")
    one_error_line(as_json, 1, "server answered 404", "doomed")
    one_error_line(softserve("tasks", "show", "doomed", "--url", url), 1, "server answered 404", "doomed")


def test_rollback_makes_an_older_version_current_as_a_new_version(live) -> None:  # type: ignore[no-untyped-def]
    url, state, files = live
    key = ("--url", url, "--key", ADMIN)
    for name in ("v1", "v2"):
        assert softserve("tasks", "push", "rb", str(files / f"{name}.safetensors"), *key).returncode == 0
    v1_sha, v2_sha = (state.store.get("rb", v).sha256 for v in (1, 2))
    assert v1_sha != v2_sha
    done = softserve("tasks", "rollback", "rb", *key)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("rolled back 'rb': version 3 is current, with the content of version 1")
    assert state.store.info("rb").version == 3 and state.store.info("rb").sha256 == v1_sha
    done = softserve("tasks", "rollback", "rb", "2", *key, "--json")
    assert json.loads(done.stdout)["version"] == 4 and json.loads(done.stdout)["restored_version"] == 2
    assert state.store.info("rb").sha256 == v2_sha
    one_error_line(softserve("tasks", "rollback", "rb", "9", *key), 1, "404", "no version 9")
    one_error_line(softserve("tasks", "rollback", "rb", "4", *key), 1, "400", "already current")
    one_error_line(softserve("tasks", "rollback", "rb", "1", "--url", url), 1, "401")
    # without VERSION, again and again: further back (v2's content came first at 2: back to 1), then no more
    done = softserve("tasks", "rollback", "rb", *key)
    assert "version 5 is current, with the content of version 1" in done.stdout, done.stderr
    one_error_line(softserve("tasks", "rollback", "rb", *key), 1, "400", "no older content")
    assert state.store.info("rb").version == 5 and state.store.info("rb").sha256 == v1_sha


def test_errors_are_one_line_and_an_exit_code(live, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url, _, files = live
    v1 = str(files / "v1.safetensors")
    one_error_line(
        softserve("tasks", "push", "t", str(tmp_path / "nope.safetensors"), "--url", url),
        2,
        "nope.safetensors",
    )
    one_error_line(softserve("tasks", "push", "t", str(tmp_path), "--url", url), 2, "adapter_config.json")
    dead = f"http://127.0.0.1:{free_port()}"
    one_error_line(softserve("tasks", "list", "--url", dead), 3, "connection refused", dead)
    one_error_line(softserve("tasks", "list", "--url", url.removeprefix("http://")), 2, "http://")
    one_error_line(softserve("tasks", "list", SOFTSERVE_URL="localhost:8000"), 2, "SOFTSERVE_URL")
    wrong_key = softserve("tasks", "push", "t", v1, "--url", url, "--key", "wrong-" * 4)
    one_error_line(wrong_key, 1, "server answered 401", "admin key")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not an artifact")
    refused = one_error_line(softserve("tasks", "push", "t", str(junk), "--url", url, "--key", ADMIN), 1)
    assert refused.startswith("softserve: error: server answered 4"), refused
    bad_id = softserve("tasks", "show", "a" * 300, "--url", url)
    one_error_line(bad_id, 1, "server answered 422", "task_id")
    one_error_line(
        run("softserve-train", "push", str(tmp_path / "nope.safetensors"), "--server", url), 2, "nope"
    )
    one_error_line(run("softserve-train", "push", str(junk), "--store", str(tmp_path / "s")), 2, "junk")
