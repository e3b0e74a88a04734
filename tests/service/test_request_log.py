"""Request ids, the one log line per request, JSON logs, keys kept out of logs, and CORS off unless configured."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from service.app import create_app
from service.settings import Settings
from tests.service.conftest import b64, free_port, running_app, shape_png

CLASSIFY = {"labels": ["red circle", "blue triangle"]}


def _access(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == "clipserve.access"]


async def test_every_answer_carries_a_request_id_and_errors_name_it(caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO, "clipserve.access")
    async with running_app() as (_, client):
        made = await client.get("/healthz")
        assert len(made.headers["x-request-id"]) == 32  # generated: a uuid4's hex

        kept = await client.post("/classify", json={**CLASSIFY, "images": []}, headers={"X-Request-ID": "job-7:a"})
        assert kept.status_code == 422
        assert kept.headers["x-request-id"] == kept.json()["error"]["request_id"] == "job-7:a"

        for insane in ("x" * 129, "two words", "new\u00e9line".encode("latin-1")):
            replaced = await client.get("/nowhere", headers={"X-Request-ID": insane})
            assert replaced.status_code == 404
            assert replaced.headers["x-request-id"] != insane
            assert replaced.json()["error"]["request_id"] == replaced.headers["x-request-id"]

        ids = {(await client.get("/healthz")).headers["x-request-id"] for _ in range(20)}
        assert len(ids) == 20


def server_timing(response: httpx.Response) -> dict[str, float]:
    stages = [entry.split(";dur=") for entry in response.headers["server-timing"].split(", ")]
    return {name: float(ms) for name, ms in stages}


async def test_server_timing_names_each_stage_of_a_classification() -> None:
    async with running_app() as (_, client):
        images = [b64(shape_png()), b64(shape_png())]
        response = await client.post("/classify", json={**CLASSIFY, "images": images})
        assert response.status_code == 200
        stages = server_timing(response)
        assert list(stages)[-1] == "app"
        # In the order the request's work noted them; the images' and the labels' halves run side by side.
        assert set(stages) == {
            "parse",
            "base64",
            "preprocess",
            "image_queue",
            "image_engine",
            "text_queue",  # the labels were new: the text engine ran beside the images
            "text_engine",
            "labels",
            "similarity",
            "respond",
            "app",
        }
        assert all(ms >= 0 for ms in stages.values())
        # The stages on the images' path ran one after another within the request's time in the app.
        images_path = ("parse", "base64", "preprocess", "image_queue", "image_engine", "similarity", "respond")
        assert sum(stages[stage] for stage in images_path) <= stages["app"]
        timing = response.json()["timing"]
        assert stages["labels"] == pytest.approx(timing["labels_ms"], abs=1e-3)

        warm = server_timing(await client.post("/classify", json={**CLASSIFY, "images": images[:1]}))
        assert "text_engine" not in warm and warm["labels"] < stages["labels"]  # every label vector was cached

        error = await client.post("/classify", json={**CLASSIFY, "images": []})
        assert error.status_code == 422 and list(server_timing(error)) == ["app"]


async def test_each_request_is_logged_once_with_route_status_duration_and_batch(caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO, "clipserve.access")
    async with running_app() as (_, client):
        caplog.clear()
        response = await client.post(
            "/classify", json={**CLASSIFY, "images": [b64(shape_png())] * 3}, headers={"X-Request-ID": "abc"}
        )
        assert response.status_code == 200
        (record,) = _access(caplog)
        assert (record.request_id, record.route, record.status) == ("abc", "/classify", 200)  # type: ignore[attr-defined]
        assert record.method == "POST" and record.duration_ms > 0  # type: ignore[attr-defined]
        assert record.batch_sizes["image"] >= 3  # type: ignore[attr-defined]
        assert "batch image=" in record.getMessage() and "id abc" in record.getMessage()

        caplog.clear()
        await client.get("/v1/classifiers/nothing")
        (missing,) = _access(caplog)
        assert (missing.route, missing.status) == ("/v1/classifiers/{name}", 404)  # type: ignore[attr-defined]


async def test_an_unexpected_error_is_a_500_in_the_error_shape_with_its_id(caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO, "clipserve.access")
    app = create_app(Settings())

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internals")

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://clipserve") as client:
        response = await client.get("/boom", headers={"X-Request-ID": "r-500"})
    assert response.status_code == 500 and response.headers["x-request-id"] == "r-500"
    assert response.json()["error"] == {
        "code": "internal_error",
        "message": "internal error; see the server log",
        "param": None,
        "request_id": "r-500",
    }
    assert "secret internals" not in response.text
    logged = [r for r in caplog.records if r.exc_info and "r-500" in r.getMessage()]
    assert logged, "the traceback must reach the server log, with the request id"
    (access,) = _access(caplog)
    assert access.status == 500  # type: ignore[attr-defined]


async def test_api_keys_never_reach_the_log(caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.DEBUG)
    key, wrong = "sk-live-0123456789abcdef", "sk-wrong-fedcba9876543210"
    async with running_app(api_keys=[key]) as (_, client):
        image = [b64(shape_png())]
        ok = await client.post(
            "/classify", json={**CLASSIFY, "images": image}, headers={"Authorization": f"Bearer {key}"}
        )
        assert ok.status_code == 200
        refused = await client.post("/classify", json={**CLASSIFY, "images": image}, headers={"X-API-Key": wrong})
        assert refused.status_code == 401 and wrong not in refused.text
        query = await client.get(f"/v1/classifiers?api_key={key}", headers={"Authorization": f"Bearer {wrong}"})
        assert query.status_code == 401
    # httpx and httpcore are this test's client, logging the URL it sent; everything else is the server.
    server = [r for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]
    logged = "\n".join(f"{r.getMessage()} {vars(r)}" for r in server)
    assert _access(caplog) and key not in logged and wrong not in logged


async def test_cors_is_off_unless_origins_are_configured() -> None:
    preflight = {"Origin": "https://example.com", "Access-Control-Request-Method": "POST"}
    async with running_app() as (_, client):
        response = await client.options("/classify", headers=preflight)
        assert "access-control-allow-origin" not in response.headers
        plain = await client.get("/healthz", headers={"Origin": "https://example.com"})
        assert "access-control-allow-origin" not in plain.headers
    async with running_app(cors_origins=["https://example.com"]) as (_, client):
        response = await client.options("/classify", headers=preflight)
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "https://example.com"
        other = await client.options("/classify", headers={**preflight, "Origin": "https://evil.example"})
        assert other.headers.get("access-control-allow-origin") != "https://evil.example"
        plain = await client.get("/healthz", headers={"Origin": "https://example.com"})
        assert "X-Request-ID" in plain.headers["access-control-expose-headers"]


def test_json_log_format_gives_one_object_per_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`clipserve serve` with CLIPSERVE_LOG_FORMAT=json, as a real process: every line it writes is one JSON
    object, uvicorn's own included, and each request is one line with its id."""
    port = free_port()
    env = {**os.environ, "CLIPSERVE_LOG_FORMAT": "json", "CLIPSERVE_STATE_DIR": str(tmp_path)}
    command = [sys.executable, "-c", "from service.cli import main; main()", "serve", "--port", str(port)]
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, "the server did not start"
            time.sleep(0.1)
        body = {**CLASSIFY, "images": [b64(shape_png())]}
        assert httpx.post(f"{url}/classify", json=body, headers={"X-Request-ID": "json-1"}).status_code == 200
    finally:
        server.send_signal(signal.SIGINT)  # SIGTERM would drain for 5 s first
        output, _ = server.communicate(timeout=30)
    lines = [line for line in output.splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # fails on any line that is not one JSON object
    assert all({"time", "level", "logger", "message"} <= set(entry) for entry in entries)
    (classify,) = [e for e in entries if e.get("request_id") == "json-1"]
    assert classify["route"] == "/classify" and classify["status"] == 200 and classify["batch_sizes"]["image"] == 1
    assert any(e["logger"].startswith("uvicorn") for e in entries)
