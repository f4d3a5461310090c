"""Gateway pools without a gateway: the websocket framing, the spec and its dspex.toml form,
the token and TLS rules, what a kernel start sends, and the client's retries against a port
that refuses (a real refused connection, no mock)."""

from __future__ import annotations

import asyncio
import getpass
import json
import socket
import struct

import pytest

from dspex_jupyter import PoolSpec, load_pool_specs
from dspex_jupyter.core.errors import (
    GatewayAuthFailed,
    GatewayError,
    GatewayKernelLost,
    GatewaySessionLost,
    GatewayUnavailable,
    InvalidSpec,
    KernelDied,
    SessionKernelLost,
    TransportNotEncrypted,
)
from dspex_jupyter.core.gateway import GatewayClient
from dspex_jupyter.core.gateway_channels import pack_message, unpack_message
from dspex_jupyter.core.gateway_config import (
    TOKEN_ENV,
    GatewayConfig,
    check_encryption,
    kernel_start_env,
    resolve_token,
)
from dspex_jupyter.core.launch import kernel_environment, resolve_source
from dspex_jupyter.core.lifecycle import spec_from_json, spec_to_json

TOKEN = "gw-token-canary-0123456789"


# ---- framing (jupyter_server's legacy binary frame) ---------------------------------------
def test_a_message_with_buffers_packs_and_unpacks_exactly():
    msg = {"header": {"msg_id": "m1", "msg_type": "comm_msg"}, "channel": "shell", "content": {}}
    buffers = [b"abc", bytearray(b"\x00\xff" * 1000), memoryview(b""), b"z"]
    frame = pack_message(msg, buffers)
    count, first = struct.unpack_from("!2I", frame)
    assert count == 1 + len(buffers) and first == 4 * (count + 1)  # the layout, big-endian
    back = unpack_message(frame)
    assert [bytes(b) for b in back.pop("buffers")] == [bytes(b) for b in buffers]
    assert back == msg


def test_frames_jupyter_server_writes_are_read():
    """A frame laid out as jupyter_server's serialize_binary_message lays it out."""
    body = json.dumps({"channel": "iopub", "header": {"msg_type": "comm_msg"}}).encode()
    parts = [body, b"one", b"two!"]
    offsets = [4 * (len(parts) + 1)]
    for part in parts[:-1]:
        offsets.append(offsets[-1] + len(part))
    frame = struct.pack(f"!{len(parts) + 1}I", len(parts), *offsets) + b"".join(parts)
    msg = unpack_message(frame)
    assert msg["channel"] == "iopub" and [bytes(b) for b in msg["buffers"]] == [b"one", b"two!"]


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\x00\x00\x00\x00\x00\x00\x00\x08",  # zero parts
        struct.pack("!2I", 5, 8) + b"{}",  # announces more parts than it holds
        struct.pack("!3I", 2, 12, 4) + b"{}xx",  # offsets going backwards
        struct.pack("!2I", 1, 8) + b"not json",
    ],
)
def test_malformed_frames_raise_value_error(frame):
    with pytest.raises(ValueError):
        unpack_message(frame)


# ---- the spec -------------------------------------------------------------------------------
def test_a_gateway_spec_and_its_masked_repr():
    spec = PoolSpec(
        "gpu",
        gateway="https://eg.example:8888/",
        kernel="python_k8s_gpu",
        size=4,
        auth_token=TOKEN,
        env_vars={"OPENAI_API_KEY": "sk-secret"},
    )
    assert spec.gateway == GatewayConfig("https://eg.example:8888")
    assert spec.gateway.ws_url == "wss://eg.example:8888" and spec.gateway.encrypted
    text = repr(spec)
    assert TOKEN not in text and "auth_token='***'" in text and "sk-secret" not in text


def test_a_manifest_never_records_the_token():
    spec = PoolSpec("gpu", gateway="https://eg.example:8888", kernel="k", auth_token=TOKEN)
    data = spec_to_json(spec)
    assert TOKEN not in json.dumps(data)
    again = spec_from_json(data, {})
    assert again.gateway == spec.gateway and again.auth_token is None


def test_gateway_pools_from_dspex_toml(tmp_path):
    path = tmp_path / "dspex.toml"
    path.write_text(
        "[pools.gpu]\n"
        'gateway = "https://eg.example:8888"\n'
        'kernel = "python_k8s_gpu"\n'
        "size = 4\n"
        'auth_token_env = "TEAM_EG_TOKEN"\n'
        "[pools.gpu.env_vars]\n"
        'DSPY_CACHEDIR = "/cache"\n'
        "[pools.tls]\n"
        'kernel = "python"\n'
        "[pools.tls.gateway]\n"
        'url = "https://10.0.0.5:8443"\n'
        'ca_certs = "/etc/ssl/eg-ca.pem"\n'
        "retry_max = 2\n"
        'allowed_envs = ["TEAM_FLAG"]\n'
    )
    gpu, tls = load_pool_specs(path)
    assert gpu.gateway.url == "https://eg.example:8888" and gpu.auth_token_env == "TEAM_EG_TOKEN"
    assert gpu.size == 4 and gpu.env_vars == {"DSPY_CACHEDIR": "/cache"}
    assert tls.gateway.ca_certs == "/etc/ssl/eg-ca.pem" and tls.gateway.retry_max == 2
    assert tls.gateway.allowed_envs == ("TEAM_FLAG",)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"gateway": "https://h:1"}, "names its kernelspec on the gateway with kernel="),
        ({"gateway": "https://h:1", "kernel": "k", "env": "e"}, "no env= or python="),
        ({"gateway": "https://h:1", "kernel": "k", "python": "/p"}, "no env= or python="),
        ({"kernel": "k", "auth_token": "t"}, "auth_token is for a gateway"),
        (
            {"gateway": "https://h:1", "kernel": "k", "auth_token": "t", "auth_token_env": "V"},
            "both auth_token and auth_token_env",
        ),
        ({"gateway": "ftp://h:1", "kernel": "k"}, "invalid gateway URL"),
        ({"gateway": "eg.example:8888", "kernel": "k"}, "invalid gateway URL"),
        ({"gateway": {"url": "https://h:1", "retries": 3}, "kernel": "k"}, "unknown key"),
        ({"gateway": {"ca_certs": "/x"}, "kernel": "k"}, "without a url"),
        ({"gateway": 8888, "kernel": "k"}, "must be a URL or a table"),
        ({"gateway": {"url": "https://h:1", "request_timeout": 0}, "kernel": "k"}, "positive"),
        ({"gateway": "https://h:1", "kernel": "k", "auth_token": ""}, "non-empty string"),
    ],
)
def test_bad_gateway_specs_are_invalid_spec_with_a_hint(kwargs, pattern):
    with pytest.raises(InvalidSpec, match=pattern) as info:
        PoolSpec("gpu", **kwargs)
    assert info.value.hint.strip()


# ---- token, TLS, environment ------------------------------------------------------------------
def test_the_token_comes_from_the_spec_its_variable_or_jupyters(monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "from-jupyter")
    monkeypatch.setenv("TEAM_EG_TOKEN", "from-team")
    assert resolve_token("p", "given", None) == "given"
    assert resolve_token("p", None, "TEAM_EG_TOKEN") == "from-team"
    assert resolve_token("p", None, None) == "from-jupyter"
    monkeypatch.delenv(TOKEN_ENV)
    assert resolve_token("p", None, None) is None
    monkeypatch.delenv("TEAM_EG_TOKEN")
    with pytest.raises(InvalidSpec, match="TEAM_EG_TOKEN, which is not set") as info:
        resolve_token("p", None, "TEAM_EG_TOKEN")
    assert "export TEAM_EG_TOKEN" in info.value.hint


@pytest.mark.parametrize(
    ("url", "allow", "expected"),
    [
        ("https://eg.example:8888", None, "tls"),
        ("http://127.0.0.1:8888", None, "disabled"),
        ("http://localhost:8888", None, "disabled"),
        ("http://[::1]:8888", None, "disabled"),
        ("http://eg.example:8888", "gpu", "disabled"),
    ],
)
def test_tls_is_required_off_this_machine(url, allow, expected):
    assert check_encryption("gpu", GatewayConfig(url), allow) == expected


def test_plain_http_to_another_machine_is_refused_unless_the_pool_opts_out():
    with pytest.raises(TransportNotEncrypted, match="without TLS") as info:
        check_encryption("gpu", GatewayConfig("http://10.1.2.3:8888"), None)
    assert "allow_unencrypted='gpu'" in info.value.hint
    with pytest.raises(TransportNotEncrypted):  # https with a plain websocket is not TLS
        check_encryption("gpu", GatewayConfig("https://h:1", ws_url="ws://h:1"), None)


def test_a_kernel_start_sends_kernel_variables_and_the_pools(monkeypatch, tmp_path):
    monkeypatch.setenv("KERNEL_TEAM", "ml")
    monkeypatch.setenv("TEAM_FLAG", "on")
    monkeypatch.setenv("NOT_SENT", "x")
    monkeypatch.delenv("KERNEL_USERNAME", raising=False)
    env = kernel_start_env(("TEAM_FLAG",))
    assert env["KERNEL_TEAM"] == "ml" and env["TEAM_FLAG"] == "on" and "NOT_SENT" not in env
    assert env["KERNEL_USERNAME"] == getpass.getuser()
    spec = PoolSpec(
        "gw",
        gateway="http://127.0.0.1:9",
        kernel="k",
        env_vars={"API_KEY": "v", "KERNEL_QUEUE": "gpu"},
    )
    source = resolve_source(spec, None, tmp_path)
    kernel_env = kernel_environment(spec, source)
    assert kernel_env["KERNEL_QUEUE"] == "gpu" and kernel_env["DSPEX_POOL"] == "gw"
    # A variable the gateway would drop stays out of the start request (API keys need not
    # sit in the gateway's logs): it follows over the kernel's channel instead.
    assert "API_KEY" not in kernel_env
    assert "PATH" not in kernel_env and "NOT_SENT" not in kernel_env  # not the notebook's own
    assert source.kernel_spec_manager is None and source.gateway is not None


def test_gateway_losses_are_kernel_deaths_and_infrastructure_errors():
    assert issubclass(GatewayKernelLost, KernelDied) and issubclass(
        GatewayKernelLost, GatewayUnavailable
    )
    assert issubclass(GatewaySessionLost, SessionKernelLost)
    assert issubclass(GatewaySessionLost, GatewayKernelLost)
    assert "dspex.resume" in GatewaySessionLost("x").hint


def test_a_gateway_that_refuses_connections_is_unavailable_after_the_retries():
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = GatewayConfig(f"http://127.0.0.1:{port}", retry_interval=0.01, retry_max=2)

    async def ask():
        client = GatewayClient(config, None, "gw")
        try:
            await client.kernelspecs()
        finally:
            await client.close()

    with pytest.raises(GatewayUnavailable, match=r"did not answer GET /api/kernelspecs .*3 tries"):
        asyncio.run(ask())


def test_unreadable_tls_files_are_invalid_spec(tmp_path):
    config = GatewayConfig("https://eg.example:8888", ca_certs=str(tmp_path / "missing.pem"))
    with pytest.raises(InvalidSpec, match="TLS files cannot be read") as info:
        _ = GatewayClient(config, None, "gw").ssl
    assert "PEM" in info.value.hint


def test_a_403_is_a_gateway_error_quoting_the_gateway_not_a_token_error():
    """A stand-in for Enterprise Gateway's refusal of a user (a real HTTP server on loopback,
    answering as EG 3.3 does: JSON with "reason" and "message")."""
    from aiohttp import web

    refusal = "User 'root' is not authorized to start kernel 'python3'."

    async def refuse(request):
        return web.json_response({"reason": refusal, "message": ""}, status=403)

    async def ask():
        app = web.Application()
        app.router.add_get("/api/kernelspecs", refuse)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        client = GatewayClient(GatewayConfig(f"http://127.0.0.1:{port}"), "a-token", "gw")
        try:
            await client.kernelspecs()
        finally:
            await client.close()
            await runner.cleanup()

    with pytest.raises(GatewayError, match="HTTP 403: User 'root' is not authorized") as info:
        asyncio.run(ask())
    assert not isinstance(info.value, GatewayAuthFailed)
