"""gateway_provisioners' Python kernel launcher, bound to one interface instead of all.

``python -m dspex_jupyter.runtime.remote_launcher --kernel-id ... --response-address ...``
takes exactly the arguments of gateway_provisioners' ``launch_ipykernel.py`` and runs that
script unchanged, except for the address it listens on: GP 0.5.0 hard-codes ``0.0.0.0`` for
the kernel's five ZMQ ports, its port probing and its signal ("comm") port, with no setting
to change it. A kernel of a pool should listen only where the notebook reaches it:

- ``DSPEX_KERNEL_IP`` (the kernelspec's ``env``) when set;
- else the address the SSH connection came in on (``SSH_CONNECTION``'s server address: the
  very host name the provisioner connects the kernel's channels to);
- else GP's own ``0.0.0.0`` (a container, whose pod address is not known ahead).

Runs on the kernel's host, in its Python; imports gateway_provisioners' launcher files from
that host's installation (pip install "dspex-jupyter[remote]" there). The wrapping is kept to
the three calls that bind; remove it once gateway_provisioners has a bind setting.
"""

from __future__ import annotations

import functools
import importlib.util
import ipaddress
import os
import runpy
import socket as _socket
import sys
import types
from pathlib import Path
from typing import Any

ANY_ADDRESS = "0.0.0.0"  # what gateway_provisioners binds; replaced below


def bind_address(environ: dict[str, str] | None = None) -> str:
    """Where this kernel listens (see the module docstring)."""
    environ = dict(os.environ if environ is None else environ)
    explicit = environ.get("DSPEX_KERNEL_IP", "").strip()
    if explicit:
        return str(ipaddress.ip_address(explicit))
    parts = environ.get("SSH_CONNECTION", "").split()
    if len(parts) == 4:
        try:
            return str(ipaddress.ip_address(parts[2]))
        except ValueError:
            pass
    return ANY_ADDRESS


def _launcher_dir() -> Path:
    import gateway_provisioners

    return Path(gateway_provisioners.__file__).parent / "kernel-launchers"


def _bound_socket_module(ip: str) -> types.ModuleType:
    """The ``socket`` module as the launcher's listener sees it: ``bind(("0.0.0.0", p))``
    becomes ``bind((ip, p))``; everything else is the real module."""

    class BoundSocket(_socket.socket):
        def bind(self, address: Any) -> None:
            if isinstance(address, tuple) and address and address[0] == ANY_ADDRESS:
                address = (ip, *address[1:])
            super().bind(address)

    module = types.ModuleType("socket")
    module.__dict__.update(_socket.__dict__)
    module.socket = BoundSocket  # type: ignore[attr-defined]
    return module


def _load_listener(ip: str) -> types.ModuleType:
    path = _launcher_dir() / "shared" / "scripts" / "server_listener.py"
    spec = importlib.util.spec_from_file_location("server_listener", path)
    assert spec is not None and spec.loader is not None
    listener = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(listener)
    write = listener.write_connection_file

    @functools.wraps(write)  # the launcher inspects its signature (Curve keys supported?)
    def write_bound(*args: Any, **kwargs: Any) -> Any:
        kwargs["ip"] = ip
        return write(*args, **kwargs)

    listener.write_connection_file = write_bound
    listener.socket = _bound_socket_module(ip)
    return listener


def _bind_kernel_app(ip: str) -> None:
    """The launcher starts ``IPKernelApp.instance(..., ip="0.0.0.0")``: give it ``ip``."""
    from ipykernel import kernelapp

    class BoundKernelApp(kernelapp.IPKernelApp):
        @classmethod
        def instance(cls, *args: Any, **kwargs: Any) -> Any:
            kwargs["ip"] = ip
            return super().instance(*args, **kwargs)

    kernelapp.IPKernelApp = BoundKernelApp  # type: ignore[misc]


def main() -> None:
    ip = bind_address()
    if ip != ANY_ADDRESS:
        sys.modules["server_listener"] = _load_listener(ip)
        _bind_kernel_app(ip)
    script = _launcher_dir() / "python" / "scripts" / "launch_ipykernel.py"
    if ip == ANY_ADDRESS:  # unchanged: GP's script with its own listener beside it
        sys.path.insert(0, str(_launcher_dir() / "shared" / "scripts"))
    sys.argv = [str(script), *sys.argv[1:]]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
