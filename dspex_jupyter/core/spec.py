"""Pool specifications: in Python, in ``dspex.toml``, or under ``[tool.dspex.pools.NAME]``."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import InvalidSpec
from .recovery import RecoveryPolicy

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_MEMORY_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1}
for _i, _p in enumerate("KMGT", start=1):
    _UNITS[f"{_p}B"] = 1000**_i
    _UNITS[_p] = 1024**_i
    _UNITS[f"{_p}IB"] = 1024**_i
MAX_POOL_SIZE = 256


def check_name(kind: str, name: Any) -> str:
    """Names become folder and kernelspec names: letters, digits, ``_ . -``, no paths."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise InvalidSpec(
            f"invalid {kind} name {name!r}",
            hint="use 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit",
        )
    return name


def parse_memory(value: Any) -> int | None:
    """``"512MB"`` (decimal), ``"4GiB"`` or ``"4G"`` (binary), or a byte count, to bytes."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidSpec(f"invalid memory size {value!r}", hint='use a string such as "4GB"')
    if isinstance(value, int):
        if value <= 0:
            raise InvalidSpec(f"memory size must be positive, got {value}")
        return value
    if isinstance(value, str):
        match = _MEMORY_PATTERN.match(value)
        if match:
            number, unit = float(match.group(1)), (match.group(2) or "").upper()
            if unit in _UNITS and number > 0:
                return int(number * _UNITS[unit])
    raise InvalidSpec(
        f"invalid memory size {value!r}",
        hint='use a positive number of bytes or a string such as "512MB", "4GB" or "2GiB"',
    )


def format_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def format_used(n: int | None, limit: int | None) -> str:
    """A size measured against ``limit``, in the same kind of unit the limit reads in:
    "530.0MB" beside a "512MB" limit, "1.2 GiB" beside a binary one."""
    text = format_limit(limit) if limit is not None else ""
    if n is None or not text.endswith(("TB", "GB", "MB", "KB")) or text.endswith("iB"):
        return format_bytes(n)
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f}B" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1000
    return f"{n}B"


def format_limit(n: int | None) -> str:
    """A size limit in the unit it was most likely given in: the largest unit, decimal
    (``"512MB"``, ``"4GB"``) or binary (``"2GiB"``), that holds it exactly; any other
    number as ``format_bytes`` writes it. ``parse_memory(format_limit(n)) == n``."""
    if n is None:
        return "-"
    for unit in ("TB", "TiB", "GB", "GiB", "MB", "MiB", "KB", "KiB"):
        size = _UNITS[unit.upper()]
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return format_bytes(n)


@dataclass(frozen=True)
class PoolSpec:
    """What a pool is: where its kernels come from and how many, with what limits.

    Exactly one of ``env`` (a ``dspex env`` environment), ``kernel`` (a kernelspec name)
    or ``python`` (an interpreter, e.g. a conda env's) says where kernels come from; with
    none, kernels use the Python running the notebook. With ``gateway`` (a Jupyter
    Enterprise Gateway or Kernel Gateway URL, or a table of its settings: GatewayConfig),
    ``kernel`` names a kernelspec of that gateway, which runs the kernels.
    """

    name: str
    env: str | None = None
    kernel: str | None = None
    python: str | None = None
    size: int = 1
    max_memory: int | str | None = None
    env_vars: dict[str, str] = field(default_factory=dict)
    gpu: bool = False
    warmup: tuple[str, ...] = ()
    startup: str = ""
    call_timeout: float | None = None
    recovery: Any = None  # a RecoveryPolicy, or a table of its fields
    # Kernels through a provisioner other than the local one talk over TCP with CurveZMQ, or
    # the pool refuses to start; naming the pool here accepts plain TCP (an explicit opt-out).
    allow_unencrypted: str | None = None
    # Kernels from a gateway (core/gateway.py): its URL or settings, and its token, given, or
    # read from the variable auth_token_env names, else from JUPYTER_GATEWAY_AUTH_TOKEN. The
    # token is never written anywhere (repr masks it; a manifest leaves it out).
    gateway: Any = None
    auth_token: str | None = None
    auth_token_env: str | None = None

    def __post_init__(self) -> None:
        check_name("pool", self.name)
        self._check_gateway()
        sources = [k for k in ("env", "kernel", "python") if getattr(self, k) is not None]
        if len(sources) > 1:
            raise InvalidSpec(
                f"pool {self.name!r} names {' and '.join(sources)}",
                hint="give exactly one of env=, kernel= or python=",
            )
        for key in ("env", "kernel", "python"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value):
                raise InvalidSpec(f"pool {self.name!r}: {key} must be a non-empty string")
        if self.env is not None:
            check_name("environment", self.env)
        if isinstance(self.size, bool) or not isinstance(self.size, int):
            raise InvalidSpec(f"pool {self.name!r}: size must be an integer, got {self.size!r}")
        if not 1 <= self.size <= MAX_POOL_SIZE:
            raise InvalidSpec(
                f"pool {self.name!r}: size must be between 1 and {MAX_POOL_SIZE}, got {self.size}"
            )
        object.__setattr__(self, "max_memory", parse_memory(self.max_memory))
        if not isinstance(self.env_vars, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.env_vars.items()
        ):
            raise InvalidSpec(
                f"pool {self.name!r}: env_vars must map strings to strings",
                hint='e.g. env_vars={"OPENAI_API_KEY": os.environ["OPENAI_API_KEY"]}',
            )
        if not isinstance(self.gpu, bool):
            raise InvalidSpec(f"pool {self.name!r}: gpu must be true or false")
        warmup = (self.warmup,) if isinstance(self.warmup, str) else self.warmup
        if not isinstance(warmup, list | tuple) or not all(isinstance(m, str) for m in warmup):
            raise InvalidSpec(f"pool {self.name!r}: warmup must be a list of module names")
        object.__setattr__(self, "warmup", tuple(warmup))
        if self.call_timeout is not None and (
            isinstance(self.call_timeout, bool)
            or not isinstance(self.call_timeout, int | float)
            or self.call_timeout <= 0
        ):
            raise InvalidSpec(
                f"pool {self.name!r}: call_timeout must be a positive number of seconds"
            )
        object.__setattr__(self, "recovery", RecoveryPolicy.coerce(self.recovery))
        if not isinstance(self.startup, str):
            raise InvalidSpec(f"pool {self.name!r}: startup must be a string of Python code")
        if self.allow_unencrypted is not None and self.allow_unencrypted != self.name:
            raise InvalidSpec(
                f"pool {self.name!r}: allow_unencrypted must be the pool's own name, got "
                f"{self.allow_unencrypted!r}",
                hint=f"to accept unencrypted kernel traffic, write allow_unencrypted={self.name!r}",
            )

    def _check_gateway(self) -> None:
        for key in ("auth_token", "auth_token_env"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value):
                raise InvalidSpec(f"pool {self.name!r}: {key} must be a non-empty string")
        if self.gateway is None:
            if self.auth_token is not None or self.auth_token_env is not None:
                raise InvalidSpec(
                    f"pool {self.name!r}: auth_token is for a gateway, and it names none",
                    hint='add gateway="https://HOST:PORT" (and kernel=its kernelspec)',
                )
            return
        from .gateway_config import GatewayConfig

        object.__setattr__(self, "gateway", GatewayConfig.coerce(self.gateway))
        if self.env is not None or self.python is not None or self.kernel is None:
            raise InvalidSpec(
                f"pool {self.name!r}: a gateway pool names its kernelspec on the gateway with "
                "kernel= (and no env= or python=)",
                hint=f'e.g. PoolSpec({self.name!r}, gateway="https://eg.example:8888", '
                'kernel="python_k8s")',
            )
        if self.auth_token is not None and self.auth_token_env is not None:
            raise InvalidSpec(
                f"pool {self.name!r} gives both auth_token and auth_token_env",
                hint="give one: the token, or the name of the variable that holds it",
            )

    def __repr__(self) -> str:
        """The dataclass's repr with ``env_vars`` values and the gateway token masked: they
        are often API keys, and a repr ends up in notebooks, logs and tracebacks."""
        parts = []
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name == "env_vars":
                value = dict.fromkeys(value, "***")
            elif item.name == "auth_token" and value is not None:
                value = "***"
            parts.append(f"{item.name}={value!r}")
        return f"PoolSpec({', '.join(parts)})"

    @property
    def max_memory_bytes(self) -> int | None:
        return self.max_memory  # type: ignore[return-value]  # normalised in __post_init__

    @classmethod
    def from_mapping(cls, name: str, data: Any) -> PoolSpec:
        if not isinstance(data, dict):
            raise InvalidSpec(
                f"pool {name!r}: its table must be a mapping, got {type(data).__name__}"
            )
        known = set(cls.__dataclass_fields__) - {"name"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidSpec(
                f"pool {name!r}: unknown key(s) {', '.join(unknown)}",
                hint=f"known keys: {', '.join(sorted(known))}",
            )
        return cls(name=name, **data)


def _read_toml(path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidSpec(f"{path}: not valid TOML: {exc}") from None


def load_pool_specs(path: str | Path | None = None) -> list[PoolSpec]:
    """Read pools from ``dspex.toml`` (``[pools.NAME]``) or ``pyproject.toml``
    (``[tool.dspex.pools.NAME]``); with no path, look in the current folder."""
    if path is None:
        for candidate in (Path("dspex.toml"), Path("pyproject.toml")):
            if candidate.is_file():
                path = candidate
                break
        else:
            raise InvalidSpec(
                "no dspex.toml or pyproject.toml in the current folder",
                hint="pass the configuration file's path",
            )
    path = Path(path)
    if not path.is_file():
        raise InvalidSpec(f"configuration file {str(path)!r} does not exist")
    data = _read_toml(path)
    if path.name == "pyproject.toml":
        data = data.get("tool", {}).get("dspex", {})
    pools = data.get("pools", {})
    if not isinstance(pools, dict):
        raise InvalidSpec(f"{path}: 'pools' must be a table of pool tables")
    return [PoolSpec.from_mapping(name, table) for name, table in pools.items()]
