"""docs/architecture.md and the README stay in step with the code: the layers' import rules hold, every
route and every metric the app exposes is named in the architecture, no link leaves the repository, and
the figures the README, the Makefile and the logs give agree."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

from fastapi.routing import APIRoute

from prompt_store.embedded_model import ensure_smollm2
from prompt_store.lru import ByteLRU
from server.app import create_app
from server.metrics import CACHE_DEVICE_PREFIX, CACHE_SERVING_FORMS, Metrics
from server.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
ARCHITECTURE = ROOT / "docs" / "architecture.md"
# package -> packages it must never import
FORBIDDEN = {
    "prompt_store": {"server", "training", "softserve_client", "bench"},
    "runtime": {"server", "training", "softserve_client", "bench"},
    "server": {"training", "bench"},
    "training": {"server", "bench"},
    "softserve_client": {"server", "training", "prompt_store", "bench"},
}
LOCAL_HOSTS = ("http://127.0.0.1", "http://localhost")


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_layers_never_import_each_other() -> None:
    problems = []
    for package, forbidden in FORBIDDEN.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            bad = imported_packages(path) & forbidden
            if bad:
                problems.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not problems, problems


def test_architecture_names_every_route(tmp_path: Path) -> None:
    text = ARCHITECTURE.read_text()
    app = create_app(Settings(store=f"disk:{tmp_path}", _env_file=None))
    missing = []
    for route in app.routes:
        if not isinstance(route, APIRoute):
            continue
        path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)  # /tasks/{task_id:taskpath} -> {task_id}
        for method in sorted(route.methods - {"HEAD"}):
            if f"`{method} {path}`" not in text:
                missing.append(f"{method} {path}")
    assert not missing, f"docs/architecture.md does not name these routes: {missing}"


def test_architecture_names_every_metric() -> None:
    metrics = Metrics()
    caches = {CACHE_SERVING_FORMS: ByteLRU[str, int](1), CACHE_DEVICE_PREFIX: ByteLRU[str, int](1)}
    metrics.track(caches, dict)
    text = ARCHITECTURE.read_text()
    exposed = set(re.findall(r"^# TYPE (softserve_\w+) (\w+)$", metrics.render().decode(), re.M))
    missing = sorted(
        name for name, kind in exposed if f"`{name}`" not in text and not name.endswith("_created")
    )
    assert len(exposed) > 15
    assert not missing, f"docs/architecture.md does not name these metrics: {missing}"


def link_problems(path: Path) -> list[str]:
    """Links (markdown targets, or any ../ path) that leave the repository or point at nothing."""
    text = path.read_text()
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://")):
            if not target.startswith(LOCAL_HOSTS):
                problems.append(target)
            continue
        resolved = (path.parent / target.split("#")[0]).resolve()
        if not resolved.is_relative_to(ROOT) or not resolved.exists():
            problems.append(target)
    for relative in re.findall(r"(?<![\w.])\.\./[\w./-]+", text):
        if not (path.parent / relative).resolve().is_relative_to(ROOT):
            problems.append(relative)
    return problems


def test_no_link_leaves_the_repository() -> None:
    problems = {
        str(p.relative_to(ROOT)): link_problems(p)
        for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    }
    assert not any(problems.values()), problems


def test_figures_agree_across_readme_makefile_and_logs() -> None:
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    bench_readme = re.search(r"make bench .*?about (\d+) min", readme)
    bench_make = re.search(r"# Every serving benchmark .*?about (\d+) min", makefile)
    assert bench_readme and bench_make, "the README and the Makefile both say how long `make bench` takes"
    assert bench_readme.group(1) == bench_make.group(1), (bench_readme.group(0), bench_make.group(0))

    log_line = re.search(r"once, ~(\d+) s", inspect.getsource(ensure_smollm2))
    readme_line = re.search(r"converts it once .*?\(about (\d+) s\)", readme, re.S)
    assert log_line and readme_line, "the conversion log line and the README both give its duration"
    assert log_line.group(1) == readme_line.group(1), (log_line.group(0), readme_line.group(0))
