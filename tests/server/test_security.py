"""Safe to expose: API keys on every route, CORS refused to unknown origins, Host checked, slow clients cut off."""
from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest

from serverkit import MODEL_NAME, metric, wait_until
from sloserve.server.guard import OPEN_PATHS, GuardSettings, loopback_hosts
from sloserve.server.http_timeouts import protocol_with_header_timeout

KEY = "sk-test-123"
OK = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 1}
EITHER = OK | {"messages": [{"role": "user", "content": "hi"}]}  # completions ignores messages, chat the prompt


@pytest.fixture(scope="module")
def guarded(chat_model_dir):
    from serverkit import LiveServer

    s = LiveServer(chat_model_dir, guard=GuardSettings(api_keys=(KEY, "sk-other")),
                   allowed_origins=["https://app.example"])
    yield s
    s.stop()


def _routes(server) -> list[tuple[str, str]]:
    out = []
    for route in server.app.routes:
        for method in sorted(getattr(route, "methods", ()) - {"HEAD"}):
            out.append((method, route.path))
    return out


def test_every_route_but_health_and_metrics_needs_the_key(guarded):
    routes = _routes(guarded)
    assert ("POST", "/v1/completions") in routes and ("GET", "/openapi.json") in routes
    for method, path in routes:
        bare = httpx.request(method, guarded.url + path, json=EITHER)
        wrong = httpx.request(method, guarded.url + path, json=EITHER, headers={"Authorization": "Bearer sk-nope"})
        right = httpx.request(method, guarded.url + path, json=EITHER, headers={"Authorization": f"Bearer {KEY}"})
        if path in OPEN_PATHS:
            assert bare.status_code == 200, path
            continue
        for r in (bare, wrong):
            assert r.status_code == 401, (method, path, r.status_code)
            assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
        # Past the gate: a route may still refuse this generic body, but never for want of a key.
        assert right.status_code < 500 and right.status_code != 401, (method, path, right.text)
        if path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/openapi.json"):
            assert right.status_code == 200, (method, path, right.text)


def test_a_second_key_works_and_a_key_must_be_bearer(guarded):
    assert httpx.post(guarded.url + "/v1/completions", json=OK, headers={"Authorization": "Bearer sk-other"}).status_code == 200
    assert httpx.post(guarded.url + "/v1/completions", json=OK, headers={"Authorization": KEY}).status_code == 401


def test_cors_preflight_is_refused_for_an_unknown_origin(guarded):
    def preflight(origin: str) -> httpx.Response:
        return httpx.options(guarded.url + "/v1/completions", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})

    evil = preflight("https://evil.example")
    assert evil.status_code == 400 and "access-control-allow-origin" not in evil.headers
    good = preflight("https://app.example")
    assert good.status_code == 200 and good.headers["access-control-allow-origin"] == "https://app.example"


def test_without_allowed_origins_no_page_may_read_responses(server):
    r = httpx.options(server.url + "/v1/completions", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers and r.status_code >= 400
    posted = httpx.post(server.url + "/v1/completions", json=OK, headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in posted.headers


def test_a_server_on_loopback_refuses_a_rebound_host_name(chat_model_dir, start_server):
    server = start_server(chat_model_dir, guard=GuardSettings(allowed_hosts=loopback_hosts("127.0.0.1")))
    rebound = httpx.post(server.url + "/v1/completions", json=OK, headers={"Host": "evil.example"})
    assert rebound.status_code == 400 and rebound.json()["error"]["code"] == "invalid_host"
    assert httpx.get(server.url + "/health", headers={"Host": "evil.example:8000"}).status_code == 400
    for host in (f"127.0.0.1:{server.port}", "localhost", f"localhost:{server.port}", "[::1]:8000"):
        assert httpx.post(server.url + "/v1/completions", json=OK, headers={"Host": host}).status_code == 200, host
    assert loopback_hosts("0.0.0.0") is None  # bound to a public address: any Host (a proxy names it)


def test_a_half_sent_request_is_cut_off(chat_model_dir, start_server):
    server = start_server(chat_model_dir, uvicorn_kwargs={"http": protocol_with_header_timeout(0.5)})
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Ty")
        t0 = time.monotonic()
        assert sock.recv(1024) == b""  # closed by the server
        assert time.monotonic() - t0 < 3
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:  # says nothing at all
        assert sock.recv(1024) == b""
    # A keep-alive connection is not cut while it sends whole requests.
    with httpx.Client(base_url=server.url) as client:
        for _ in range(3):
            assert client.post("/v1/completions", json=OK).status_code == 200
            time.sleep(0.3)


def test_a_slow_body_gets_408(chat_model_dir, start_server):
    server = start_server(chat_model_dir, body_timeout_s=0.5)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"prompt\":")
        reply = b""
        while chunk := sock.recv(4096):  # headers and body may come in separate segments; then it closes
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408") and b"request_timeout" in reply


def test_one_key_cannot_hold_more_than_its_output_budget(chat_model_dir, start_server):
    server = start_server(chat_model_dir, step_delay_s=0.02, guard=GuardSettings(api_keys=("a", "b")),
                          max_output_tokens_per_key=60)
    body = {"model": MODEL_NAME, "prompt": "hi", "ignore_eos": True}
    holder = threading.Thread(target=lambda: httpx.post(
        server.url + "/v1/completions", json=body | {"max_tokens": 50}, headers={"Authorization": "Bearer a"}, timeout=60))
    holder.start()
    assert wait_until(lambda: metric(server.metrics(), "sloserve:num_requests_running") == 1)
    over = httpx.post(server.url + "/v1/completions", json=body | {"max_tokens": 20}, headers={"Authorization": "Bearer a"})
    assert over.status_code == 429 and over.json()["error"]["code"] == "output_budget_exceeded"
    other = httpx.post(server.url + "/v1/completions", json=body | {"max_tokens": 20}, headers={"Authorization": "Bearer b"})
    assert other.status_code == 200
    holder.join(60)
    # Released when it ended: the key may spend its budget again.
    again = httpx.post(server.url + "/v1/completions", json=body | {"max_tokens": 60}, headers={"Authorization": "Bearer a"})
    assert again.status_code == 200 and server.ctx.budget.reserved == {}


def test_metrics_show_output_length_per_request(server):
    before = metric(server.metrics(), "sloserve:request_generation_tokens_count")
    assert httpx.post(server.url + "/v1/completions", json=OK | {"max_tokens": 7, "ignore_eos": True}).status_code == 200
    m = server.metrics()
    assert metric(m, "sloserve:request_generation_tokens_count") == before + 1
    assert metric(m, "sloserve:request_generation_tokens_bucket", le="5.0") < metric(
        m, "sloserve:request_generation_tokens_bucket", le="10.0")


def test_openapi_document_describes_the_request_bodies(server):
    schema = httpx.get(server.url + "/openapi.json").json()
    body = schema["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/CompletionRequest"}
    fields = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    assert "prompt" in fields
    # The server's own limits are stated: its model names and the max_tokens cap.
    assert fields["model"]["anyOf"][0] == {"enum": [MODEL_NAME]}
    assert fields["max_tokens"]["anyOf"][0]["maximum"] == server.ctx.limits.max_tokens_cap == 200
