"""`sloserve serve`: its knobs parse, and a missing model directory is a clear error, not a traceback."""
from __future__ import annotations

import httpx
import pytest
import typer
from typer.testing import CliRunner

from serverkit import MODEL_NAME
from sloserve.cli import app
from sloserve.cli_args import default_model_dir, parse_bytes


@pytest.mark.parametrize("text,expected", [("1024", 1024), ("2GiB", 2 << 30), ("512MB", 512 * 10**6), ("1.5k", 1500)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "5 parsecs", "0"])
def test_parse_bytes_rejects(text):
    with pytest.raises(typer.BadParameter):
        parse_bytes(text)


def test_default_model_is_the_bundled_demo_path():
    assert default_model_dir().parts[-3:] == ("sloserve", "assets", "demo-target")


def test_missing_model_directory_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(app, ["serve", str(tmp_path / "nowhere")])
    assert result.exit_code == 2
    words = " ".join(result.output.replace("│", " ").split())  # undo rich's boxed line wrapping
    assert "not a Hugging Face model directory" in words


def test_null_parameters_mean_defaults(server):
    body = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 3, "temperature": None, "top_p": None, "n": None,
            "stop": None, "seed": None, "stream": None, "ignore_eos": True}
    r = httpx.post(server.url + "/v1/completions", json=body)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def _words(result) -> str:
    return " ".join(result.output.replace("│", " ").split())


def test_a_busy_port_fails_before_the_model_loads(chat_model_dir, monkeypatch):
    import socket

    import sloserve.llm

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded although the port is busy")

    monkeypatch.setattr(sloserve.llm, "build_engine", never)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(app, ["serve", str(chat_model_dir), "--load-format", "dummy", "--port", str(port)])
    assert result.exit_code == 2 and "cannot listen on 127.0.0.1" in _words(result)


def test_a_model_without_tokenizer_needs_skip_tokenizer_init(tiny_model_dir):
    result = CliRunner().invoke(app, ["serve", str(tiny_model_dir("llama")), "--load-format", "dummy"])
    assert result.exit_code == 2 and "--skip-tokenizer-init" in _words(result)


def test_version_flag_and_the_policy_alias():
    import sloserve

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == sloserve.__version__
    for flag in ("--scheduling-policy", "--policy"):
        bad = CliRunner().invoke(app, ["serve", flag, "nonsense"])
        assert bad.exit_code == 2 and "unknown policy 'nonsense'" in _words(bad)


def test_serve_over_tls_with_an_api_key_from_the_environment(chat_model_dir, tmp_path):
    """The flags reach uvicorn and the app: https with a self-signed certificate, the key from SLOSERVE_API_KEY."""
    import os
    import shutil
    import socket
    import subprocess
    import sys

    from serverkit import wait_until

    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost"], check=True, capture_output=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "sloserve.cli", "serve", str(chat_model_dir), "--load-format", "dummy", "--port", str(port),
         "--num-kv-blocks", "32", "--log-level", "warning", "--ssl-keyfile", str(key), "--ssl-certfile", str(cert)],
        env=os.environ | {"SLOSERVE_API_KEY": "sk-env"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"https://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return httpx.get(url + "/health", verify=False, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        assert wait_until(lambda: healthy() or proc.poll() is not None, timeout=60, interval=0.2)
        assert proc.poll() is None, proc.stdout.read()
        assert httpx.get(url + "/v1/models", verify=False).status_code == 401
        authorized = httpx.get(url + "/v1/models", verify=False, headers={"Authorization": "Bearer sk-env"})
        assert authorized.status_code == 200 and authorized.json()["data"][0]["id"] == chat_model_dir.name
        # Bound to loopback: a rebound DNS name is refused.
        assert httpx.get(url + "/health", verify=False, headers={"Host": "evil.example"}).status_code == 400
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.parametrize("flags, says", [
    (["--policy", "edf"], "unknown policy 'edf'"),
    (["--admission", "maybe"], "unknown admission 'maybe'"),
    (["--slo-class", "interactive=ttft:200ms", "--default-slo-class", "batch"], "default SLO class 'batch' is not defined"),
    (["--slo-class", "interactive=speed:fast"], "bad SLO term"),
    (["--profile", "/nonexistent/profile.json"], "profile.json"),
])
def test_scheduling_flags_are_checked_before_the_model_loads(chat_model_dir, flags, says):
    result = CliRunner().invoke(app, ["serve", str(chat_model_dir), "--load-format", "dummy", *flags])
    assert result.exit_code == 2
    assert says in " ".join(result.output.replace("│", " ").split())


def test_slo_classes_parse_into_engine_slos():
    from sloserve.cli_args import parse_slo_classes
    from sloserve.request import SLO

    classes = parse_slo_classes(["interactive=ttft:200ms,tpot:50ms", "batch=ttft:10s,tpot:200ms"], "interactive")
    assert classes.classes == {"interactive": SLO(ttft=0.2, tpot=0.05), "batch": SLO(ttft=10.0, tpot=0.2)}
    assert classes.resolve(None) == SLO(ttft=0.2, tpot=0.05)
    with pytest.raises(ValueError, match="given twice"):
        parse_slo_classes(["a=ttft:1s", "a=ttft:2s"], None)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the behaviour without a GPU")
@pytest.mark.parametrize("command", ["serve", "generate"])
def test_asking_for_cuda_without_a_gpu_is_a_clear_error(command):
    args = [command, str(default_model_dir()), "--device", "cuda"] + (["-p", "hi"] if command == "generate" else [])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2  # a usage error with a message, not a traceback
    assert "no CUDA GPU" in " ".join(result.output.replace("│", " ").split())


def test_served_connections_send_without_nagle_delay():
    """Connections accepted on the server's socket have TCP_NODELAY: else a keep-alive client waits ~40 ms
    (Nagle holds the response body until the headers are ACKed, and the client delays its ACK) on every request."""
    import asyncio
    import socket

    from sloserve.server.cli import bind_socket

    async def accepted_nodelay() -> int:
        sock = bind_socket("127.0.0.1", 0)
        seen: asyncio.Future = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport) -> None:
                seen.set_result(transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

        server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
        _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        try:
            return await asyncio.wait_for(seen, 5)
        finally:
            writer.close()
            server.close()

    assert asyncio.run(accepted_nodelay()) != 0
