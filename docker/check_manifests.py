"""Offline checks of deployment files that docker-compose 1.29 and hadolint miss (`make docker-check`).

- docker/k8s/*.yaml parse, every document has apiVersion/kind/metadata.name, kustomization resources exist,
  Deployments probe /readyz (readiness) and /healthz (liveness).
- the root docker-compose.yml only `include:`s files that exist (Compose v2.20+ syntax, which 1.29 rejects).
- docker/nginx.conf's upstream names every server replica of docker/compose.yml, and its body limit follows
  SOFTSERVE_MAX_BODY_BYTES.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"


def check_k8s(errors: list[str]) -> None:
    folder = DOCKER / "k8s"
    files = sorted(folder.glob("*.yaml"))
    if not files:
        errors.append("docker/k8s: no manifests")
    for path in files:
        name = path.relative_to(ROOT)
        try:
            docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        except yaml.YAMLError as exc:
            errors.append(f"{name}: invalid YAML: {exc}")
            continue
        for doc in docs:
            if not isinstance(doc, dict) or not doc.get("apiVersion") or not doc.get("kind"):
                errors.append(f"{name}: a document without apiVersion/kind")
                continue
            if doc["kind"] == "Kustomization":
                missing = [r for r in doc.get("resources", []) if not (folder / r).is_file()]
                errors += [f"{name}: resource {r} does not exist" for r in missing]
                continue
            if not doc.get("metadata", {}).get("name"):
                errors.append(f"{name}: {doc['kind']} without metadata.name")
            if doc["kind"] == "Deployment":
                check_probes(name, doc, errors)


def check_probes(name: Path, doc: dict[str, Any], errors: list[str]) -> None:
    for container in doc["spec"]["template"]["spec"]["containers"]:
        if not container.get("ports"):
            continue  # no HTTP (the fine-tuning worker): its jobs' heartbeats are its health
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            got = container.get(probe, {}).get("httpGet", {}).get("path")
            if got != path:
                errors.append(f"{name}: container {container['name']} {probe} is {got!r}, expected {path}")


def check_root_compose(errors: list[str]) -> None:
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    if not isinstance(doc, dict) or set(doc) != {"include"}:
        errors.append("docker-compose.yml: expected only an `include:` list")
        return
    for entry in doc["include"]:
        path = entry["path"] if isinstance(entry, dict) else entry
        if not (ROOT / path).is_file():
            errors.append(f"docker-compose.yml: included {path} does not exist")


def check_nginx(errors: list[str]) -> None:
    compose = yaml.safe_load((DOCKER / "compose.yml").read_text())
    replicas = sorted(s for s in compose["services"] if re.fullmatch(r"server-\d+", s))
    conf = (DOCKER / "nginx.conf").read_text()
    upstream = sorted(re.findall(r"^\s*server\s+(server-\d+):8000\b", conf, re.MULTILINE))
    if not replicas or upstream != replicas:
        errors.append(f"docker/nginx.conf upstream {upstream} != compose replicas {replicas}")
    if "client_max_body_size ${SOFTSERVE_MAX_BODY_BYTES};" not in conf:
        errors.append("docker/nginx.conf: client_max_body_size must follow ${SOFTSERVE_MAX_BODY_BYTES}")
    if not re.search(r"^\s*proxy_buffering off;", conf, re.MULTILINE):
        errors.append("docker/nginx.conf: proxy_buffering off is needed for SSE")


def main() -> int:
    errors: list[str] = []
    for check in (check_k8s, check_root_compose, check_nginx):
        check(errors)
    for error in errors:
        print(f"docker-check: {error}", file=sys.stderr)
    if not errors:
        print("docker-check: k8s manifests, root docker-compose.yml and nginx.conf OK")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
