"""The gateway fixtures themselves: each gateway starts from its own environment, answers its
token and refuses others, and stops leaving no process (its kernels included)."""

from __future__ import annotations

import json
import os
import socket
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.integration.gateway_fixtures import HOST, GatewayServer, missing_reason

pytestmark = pytest.mark.integration


def _start_kernel(server: GatewayServer) -> str:
    """POST /api/kernels as a client would; the kernel's process exists once this returns."""
    body = json.dumps({"name": server.kernel_name, "env": {"KERNEL_USERNAME": "dspex-test"}})
    request = urllib.request.Request(
        server.url + "/api/kernels",
        data=body.encode(),
        headers={**server.headers, "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30, context=server.ssl_context()) as reply:
        assert reply.status == 201
        return str(json.loads(reply.read())["id"])


def _port_is_closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((HOST, port)) != 0


# The restart and crash paths are the fixture's own code, the same for both gateways: they run
# on EG, which starts in about half Kernel Gateway's time (jupyter_server 2's imports).
@pytest.mark.parametrize(
    ("kind", "tls", "restart"),
    [("kg", False, False), ("eg", False, True), ("eg", True, False)],
    ids=["kg", "eg", "eg-tls"],
)
def test_gateway_answers_its_token_and_stops_with_its_kernels(
    kind: str, tls: bool, restart: bool, tmp_path: Path
) -> None:
    reason = missing_reason(kind)
    if reason:
        pytest.skip(reason)
    server = GatewayServer(kind, tmp_path / kind, tls=tls)
    try:
        server.start()
        assert server.url.startswith("https://" if tls else "http://")
        assert server.get("/api/kernelspecs") == 200
        assert server.get("/api/kernelspecs", token="not-the-token") == 401
        if tls:  # the certificate is for 127.0.0.1 and trusted through ca_cert only
            assert (tmp_path / kind / "gateway-key.pem").stat().st_mode & 0o777 == 0o600
            with pytest.raises(OSError, match="CERTIFICATE_VERIFY_FAILED"):
                urllib.request.urlopen(server.url + "/api", timeout=10)

        kernel_id = _start_kernel(server)
        kernels = server.kernel_processes()
        assert len(kernels) == 1
        # A kernel runs in a session of its own, outside the gateway's process group: stop()
        # must find it by descent, not by group.
        gateway_pid = server.process.pid  # type: ignore[union-attr]
        assert os.getpgid(kernels[0].pid) != os.getpgid(gateway_pid)

        server.stop()
        _, alive = psutil.wait_procs(kernels, timeout=10)
        assert not alive and _port_is_closed(server.port)
        if not restart:
            return

        # A restart keeps the url and token; the old kernel did not survive it.
        server.start()
        assert server.get("/api/kernelspecs") == 200
        assert server.get(f"/api/kernels/{kernel_id}") == 404

        # A crash (SIGKILL of the gateway alone) orphans its kernels; close() still ends them.
        _start_kernel(server)
        kernels = server.kernel_processes()
        assert len(kernels) == 1
        server.crash()
        assert server.process is None
        server.close()
        _, alive = psutil.wait_procs(kernels, timeout=10)
        assert not alive
    finally:
        server.close()
    assert server.process is None and _port_is_closed(server.port)
