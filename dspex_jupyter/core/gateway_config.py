"""A gateway's settings as a pool spec holds them (no network code here: specs are read
without importing aiohttp), and the rules applied before any kernel starts: TLS, the token,
the variables sent with a kernel start. The client is ``gateway.py``."""

from __future__ import annotations

import getpass
import ipaddress
import os
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .errors import InvalidSpec, TransportNotEncrypted

# The variable jupyter_server's GatewayClient reads its token from when none is configured.
TOKEN_ENV = "JUPYTER_GATEWAY_AUTH_TOKEN"


@dataclass(frozen=True)
class GatewayConfig:
    """Where a gateway is and how to talk to it (jupyter_server's GatewayClient names and
    defaults). The token is not here: it is the pool's ``auth_token`` and never recorded."""

    url: str
    ws_url: str | None = None
    request_timeout: float = 42.0
    connect_timeout: float = 40.0
    launch_timeout_pad: float = 2.0
    validate_cert: bool = True
    ca_certs: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    retry_interval: float = 1.0
    retry_interval_max: float = 30.0
    retry_max: int = 5
    # Variables of this process sent with each kernel start besides KERNEL_* (GatewayClient's
    # allowed_envs): the gateway decides which reach the kernel.
    allowed_envs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        parts = urlsplit(self.url) if isinstance(self.url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidSpec(
                f"invalid gateway URL {self.url!r}",
                hint='give the gateway\'s base URL, e.g. gateway="https://eg.example:8888"',
            )
        object.__setattr__(self, "url", self.url.rstrip("/"))
        if self.ws_url is None:
            scheme = "wss" if parts.scheme == "https" else "ws"
            object.__setattr__(self, "ws_url", urlunsplit((scheme, *parts[1:])).rstrip("/"))
        elif urlsplit(self.ws_url).scheme not in ("ws", "wss"):
            raise InvalidSpec(f"invalid gateway ws_url {self.ws_url!r}", hint="use ws:// or wss://")
        for name in ("request_timeout", "connect_timeout", "retry_interval", "retry_interval_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise InvalidSpec(f"gateway {name} must be a positive number, got {value!r}")
        if not isinstance(self.launch_timeout_pad, int | float) or self.launch_timeout_pad < 0:
            raise InvalidSpec("gateway launch_timeout_pad must be a number >= 0")
        if isinstance(self.retry_max, bool) or not isinstance(self.retry_max, int):
            raise InvalidSpec(f"gateway retry_max must be an integer, got {self.retry_max!r}")
        if not isinstance(self.validate_cert, bool):
            raise InvalidSpec("gateway validate_cert must be true or false")
        envs = (self.allowed_envs,) if isinstance(self.allowed_envs, str) else self.allowed_envs
        if not isinstance(envs, list | tuple) or not all(isinstance(e, str) for e in envs):
            raise InvalidSpec("gateway allowed_envs must be a list of variable names")
        object.__setattr__(self, "allowed_envs", tuple(envs))

    @classmethod
    def coerce(cls, value: Any) -> GatewayConfig:
        """A URL, a table of these fields (``dspex.toml``), or a GatewayConfig."""
        if isinstance(value, GatewayConfig):
            return value
        if isinstance(value, str):
            return cls(url=value)
        if isinstance(value, dict):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(value) - known)
            if unknown or "url" not in value:
                raise InvalidSpec(
                    f"gateway table: unknown key(s) {', '.join(unknown)}"
                    if unknown
                    else "gateway table without a url",
                    hint=f"known keys: {', '.join(sorted(known))}",
                )
            return cls(**value)
        raise InvalidSpec(
            f"gateway must be a URL or a table, got {type(value).__name__}",
            hint='e.g. gateway="https://eg.example:8888"',
        )

    @property
    def encrypted(self) -> bool:
        return urlsplit(self.url).scheme == "https" and urlsplit(self.ws_url or "").scheme == "wss"

    @property
    def on_loopback(self) -> bool:
        host = urlsplit(self.url).hostname or ""
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False


def check_encryption(pool: str, config: GatewayConfig, allow_unencrypted: str | None) -> str:
    """TLS (https and wss) for a gateway that is not on this machine, unless the pool opted
    out by its own name (the rule, and the error, of kernels through a provisioner)."""
    if config.encrypted:
        return "tls"
    if config.on_loopback or allow_unencrypted == pool:
        return "disabled"
    raise TransportNotEncrypted(
        f"pool {pool!r} talks to gateway {config.url} without TLS (http/ws): its token and "
        "every message would cross the network in clear",
        hint=f"use the gateway's https:// URL, or accept plain HTTP by naming the pool: "
        f"PoolSpec({pool!r}, ..., allow_unencrypted={pool!r})",
    )


def resolve_token(pool: str, auth_token: str | None, auth_token_env: str | None) -> str | None:
    """The pool's token: given, read from the variable it names, or jupyter_server's
    JUPYTER_GATEWAY_AUTH_TOKEN (None: the gateway takes no token)."""
    if auth_token:
        return auth_token
    if auth_token_env:
        value = os.environ.get(auth_token_env)
        if not value:
            raise InvalidSpec(
                f"pool {pool!r}: auth_token_env names {auth_token_env}, which is not set",
                hint=f"export {auth_token_env}=<the gateway's token> before starting the pool",
            )
        return value
    return os.environ.get(TOKEN_ENV) or None


def kernel_start_env(allowed_envs: tuple[str, ...] = ()) -> dict[str, str]:
    """What jupyter_server's GatewayClient sends with a kernel start: the KERNEL_* variables
    of this process (KERNEL_USERNAME defaulting to this user, as Enterprise Gateway expects)
    and the allowed ones."""
    env = {k: v for k, v in os.environ.items() if k.startswith("KERNEL_") or k in allowed_envs}
    env.setdefault("KERNEL_USERNAME", getpass.getuser())
    return env
