"""OpenAI `stop` given as one string has the limits of the list form (non-empty, at most 128 characters):
a 422 that names `stop`, on real uvicorn, for both OpenAI routes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from live_server import threaded_server

ROUTES = {
    "/v1/completions": {"prompt": "hi"},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}]},
}
BAD_STOPS = {"empty": "", "129-chars": "s" * 129}


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with threaded_server(tmp_path_factory.mktemp("stop")) as (base, _):
        yield base


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("form", ["string", "list"])
@pytest.mark.parametrize("stop", list(BAD_STOPS.values()), ids=list(BAD_STOPS))
def test_bad_stop_is_422_naming_stop(url: str, route: str, form: str, stop: str) -> None:
    body: dict[str, Any] = {**ROUTES[route], "max_tokens": 2, "stop": stop if form == "string" else [stop]}
    r = httpx.post(url + route, json=body, timeout=30)
    assert r.status_code == 422, r.text
    assert "stop" in r.text
    assert ("128" in r.text) if stop else ("at least 1" in r.text)


@pytest.mark.parametrize("route", list(ROUTES))
def test_good_stop_string_is_served(url: str, route: str) -> None:
    body = {**ROUTES[route], "max_tokens": 2, "stop": "s" * 128}
    assert httpx.post(url + route, json=body, timeout=30).status_code == 200
