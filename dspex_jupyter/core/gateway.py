"""A small asyncio client for Jupyter Enterprise Gateway 3.x and Kernel Gateway 3.x.

A gateway starts kernels for us (on Kubernetes, YARN, Docker... behind it) and speaks REST
(``/api/kernelspecs``, ``/api/kernels``...) plus one websocket per kernel
(``/api/kernels/ID/channels``, see ``gateway_channels.py``). The settings follow jupyter_server's
``GatewayClient`` (url, ws_url, auth_token, request_timeout, connect_timeout,
launch_timeout_pad, allowed_envs, retries with back-off, validate_cert, ca_certs,
client_cert/client_key), so a team's gateway settings carry over.

Why not jupyter_server's ``GatewayClient`` itself: it is a process-wide singleton configured
through traitlets for a Jupyter *server* (one gateway per process, read from the server's
config), it pulls in the whole server, and its websocket proxy decodes binary frames as text,
which breaks message buffers (remote-kernels.md). aiohttp is one well-kept library for both
HTTP and websockets on the asyncio loop the pools already run on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp

from .errors import GatewayAuthFailed, GatewayError, GatewayUnavailable, InvalidSpec
from .gateway_config import GatewayConfig

# Statuses worth another try: the gateway (or a proxy in front of it) is restarting.
_RETRY_STATUSES = frozenset({502, 503, 504})
logger = logging.getLogger("dspex_jupyter.gateway")


@dataclass(eq=False)
class GatewayClient:
    """One pool's connection to its gateway: one aiohttp session (its connection pool)
    for the REST calls and every kernel's websocket. Lives on the manager's loop."""

    config: GatewayConfig
    token: str | None = field(default=None, repr=False)
    pool: str = ""
    _session: aiohttp.ClientSession | None = field(default=None, repr=False)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"} if self.token else {}

    @property
    def ssl(self) -> ssl.SSLContext | bool:
        """The TLS settings of every request and websocket (unused with plain http): the
        system's CAs or ``ca_certs``, a client certificate for mutual TLS, or no checks at
        all with ``validate_cert=False`` (a test gateway only)."""
        config = self.config
        if not config.validate_cert:
            return False
        try:
            context = ssl.create_default_context(cafile=config.ca_certs)
            if config.client_cert:
                context.load_cert_chain(config.client_cert, config.client_key)
        except (OSError, ssl.SSLError) as exc:
            raise InvalidSpec(
                f"pool {self.pool!r}: the gateway's TLS files cannot be read: {exc}",
                hint="ca_certs, client_cert and client_key are paths of PEM files",
            ) from exc
        return context

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self.ssl)
            self._session = aiohttp.ClientSession(connector=connector, headers=self.headers)
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    def delay(self, attempt: int) -> float:
        """Back-off before retry ``attempt`` (1, 2...), as GatewayClient's retries grow."""
        config = self.config
        return min(config.retry_interval * 2 ** (attempt - 1), config.retry_interval_max)

    # ---- REST -------------------------------------------------------------------------
    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        timeout: float | None = None,
        retry_sent: bool = True,
        missing_ok: bool = False,
    ) -> Any:
        """One REST call; its JSON answer (None for 204, or for 404 when ``missing_ok``).

        A refused connection is retried with back-off (the request never left); a timeout
        or a 502/503/504 too when ``retry_sent`` (the request is safe to repeat). Once the
        retries are spent: GatewayUnavailable. 401: GatewayAuthFailed; another error
        status: GatewayError quoting the gateway's reason."""
        url = f"{self.config.url}{path}"
        limit = aiohttp.ClientTimeout(
            total=timeout or self.config.request_timeout, connect=self.config.connect_timeout
        )
        attempt = 0
        while True:
            problem = ""
            try:
                async with self.session.request(method, url, json=body, timeout=limit) as reply:
                    if reply.status in _RETRY_STATUSES and retry_sent:
                        problem = f"HTTP {reply.status}"
                    else:
                        return await self._answer(method, path, reply, missing_ok)
            except aiohttp.ClientSSLError as exc:  # retrying will not make it trusted
                raise GatewayError(
                    f"TLS with gateway {self.config.url} failed (pool {self.pool!r}): {exc}",
                    hint="trust the gateway's certificate: gateway={'url': ..., 'ca_certs': "
                    "'/path/ca.pem'} (or its CA in the system store)",
                ) from exc
            except aiohttp.ClientConnectorError as exc:
                problem = str(exc)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                if not retry_sent:
                    raise self.unavailable(f"{method} {path}", exc) from exc
                problem = f"{type(exc).__name__}: {exc}"
            attempt += 1
            if attempt > self.config.retry_max:
                raise self.unavailable(f"{method} {path}", problem)
            await asyncio.sleep(self.delay(attempt))  # back-off before a retry

    def unavailable(self, what: str, problem: Any) -> GatewayUnavailable:
        tries = self.config.retry_max + 1
        return GatewayUnavailable(
            f"gateway {self.config.url} did not answer {what} (pool {self.pool!r}, {tries} "
            f"tries): {problem}"
        )

    async def _answer(
        self, method: str, path: str, reply: aiohttp.ClientResponse, missing_ok: bool
    ) -> Any:
        if reply.status == 401:  # 403 is a refusal for another reason (user, max_kernels)
            raise GatewayAuthFailed(
                f"gateway {self.config.url} refused pool {self.pool!r}'s token "
                f"(HTTP 401 for {method} {path})"
                if self.token
                else f"gateway {self.config.url} wants a token (HTTP 401) and pool "
                f"{self.pool!r} has none"
            )
        if reply.status == 404 and missing_ok:
            return None
        if reply.status >= 400:
            text = await reply.text()
            raise GatewayError(
                f"gateway {self.config.url}: {method} {path} failed with HTTP {reply.status}: "
                f"{_gateway_message(text)}"
            )
        text = await reply.text()
        return json.loads(text) if reply.status != 204 and text.strip() else None

    async def kernelspecs(self) -> dict[str, Any]:
        data = await self.request("GET", "/api/kernelspecs")
        return dict((data or {}).get("kernelspecs") or {})

    async def check_kernelspec(self, name: str) -> dict[str, Any]:
        """The gateway's kernelspec ``name`` (this also proves the token, once per pool)."""
        specs = await self.kernelspecs()
        if name not in specs:
            raise InvalidSpec(
                f"pool {self.pool!r}: gateway {self.config.url} has no kernelspec {name!r}",
                hint=f"its kernelspecs: {', '.join(sorted(specs)) or 'none'}",
            )
        return dict(specs[name])

    async def start_kernel(self, name: str, env: dict[str, str], launch_timeout: float) -> str:
        """POST /api/kernels; the new kernel's id. The gateway waits up to
        KERNEL_LAUNCH_TIMEOUT for the kernel; the request waits that plus the pad."""
        env = {**env, "KERNEL_LAUNCH_TIMEOUT": str(int(launch_timeout))}
        model = await self.request(
            "POST",
            "/api/kernels",
            body={"name": name, "env": env},
            timeout=launch_timeout + self.config.launch_timeout_pad,
            retry_sent=False,  # a repeated POST could start a second kernel
        )
        return str(model["id"])

    async def kernel_model(self, kernel_id: str) -> dict[str, Any] | None:
        """GET /api/kernels/ID; None when the gateway no longer has it (culled, deleted)."""
        return await self.request("GET", f"/api/kernels/{quote(kernel_id)}", missing_ok=True)

    async def interrupt(self, kernel_id: str) -> None:
        await self.request("POST", f"/api/kernels/{quote(kernel_id)}/interrupt", missing_ok=True)

    async def restart(self, kernel_id: str) -> None:
        await self.request("POST", f"/api/kernels/{quote(kernel_id)}/restart", retry_sent=False)

    async def delete(self, kernel_id: str) -> None:
        await self.request("DELETE", f"/api/kernels/{quote(kernel_id)}", missing_ok=True)

    def channels_url(self, kernel_id: str, session_id: str) -> str:
        return (
            f"{self.config.ws_url}/api/kernels/{quote(kernel_id)}/channels?session_id={session_id}"
        )


def _gateway_message(text: str) -> str:
    """The gateway's own words from an error body (jupyter_server answers JSON with
    "message" and "reason"), else the body's start."""
    try:
        data = json.loads(text)
    except ValueError:
        return text[:300]
    if isinstance(data, dict):
        return str(data.get("message") or data.get("reason") or data)[:300]
    return str(data)[:300]
