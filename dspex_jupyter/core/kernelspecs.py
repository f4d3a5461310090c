"""Kernelspecs for kernels on other machines: ``dspex kernelspec ssh|k8s|docker NAME``.

A pool runs any kernelspec with any jupyter_client provisioner (``PoolSpec(kernel=NAME)``);
this module writes the ones gateway_provisioners launches: over SSH on a list of hosts
(``distributed-provisioner``), as a Kubernetes pod (``kubernetes-provisioner``) or a Docker
container (``docker-provisioner``). The provisioner runs in the notebook's own process.

They are made by gateway_provisioners' own generators (the ``jupyter ssh-spec``,
``k8s-spec`` and ``docker-spec`` installers, so the launcher scripts, argv placeholders and
provisioner stanza are exactly theirs) into dspex's private kernelspec folder
(``$DSPEX_HOME/share/jupyter/kernels``), then given what dspex adds:

- ``argv[0]``: the Python that runs the launcher. Over SSH it is the remote host's (the
  environment's Python, at the same path there, or ``remote_python``); for containers it is
  this machine's, because their launcher runs here and asks the cluster for a pod.
- ``--kernel-class-name`` names ``dspex_jupyter.runtime.remote_kernel.DspexKernel``, so the
  dspex runtime answers from the kernel's first message (in a pod too: the image's
  ``bootstrap-kernel.sh`` reads it from ``KERNEL_CLASS_NAME``).
- ``metadata.dspex``: what the pool's launch applies that gateway_provisioners reads from the
  launching process's environment rather than from a kernelspec (``GP_RESPONSE_IP``,
  ``GP_REMOTE_USER``, ``GP_SSH_PORT``), and the transport encryption policy: CurveZMQ
  ``required`` unless the caller says otherwise.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import NoSuchKernel

from .envs import dspex_home, get_environment, kernel_spec_manager, kernels_dir
from .errors import KernelspecError

KINDS = ("ssh", "k8s", "docker")
PROVISIONERS = {
    "ssh": "distributed-provisioner",
    "k8s": "kubernetes-provisioner",
    "docker": "docker-provisioner",
}
# The ipykernel subclass remote kernels run: the dspex comm is registered as it starts.
KERNEL_CLASS = "dspex_jupyter.runtime.remote_kernel.DspexKernel"
# What an SSH host runs: gateway_provisioners' launch_ipykernel.py from the host's own
# gateway_provisioners, binding the kernel's ports to the address the SSH hop came in on
# rather than 0.0.0.0 (runtime/remote_launcher.py).
SSH_LAUNCHER = "dspex_jupyter.runtime.remote_launcher"
ENCRYPTION_POLICIES = ("required", "auto", "disabled")
# Where an SSH kernel's launcher sends its connection info: this machine's loopback, which
# only a host on this machine reaches (127.0.0.2 in the tests). Real hosts need an address of
# this machine they can reach: ``response_ip=``.
DEFAULT_SSH_RESPONSE_IP = "127.0.0.1"
_KERNEL_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_HOST = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
_USER = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$")
_NAMESPACE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")  # RFC 1123 label
# An image reference, as Docker's reference grammar (distribution/reference) has it:
# [domain[:port]/]path[/path...][:tag][@digest]
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*(?::[0-9]+)?"
_PATH = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_IMAGE = re.compile(
    rf"^(?:{_DOMAIN}/)?{_PATH}(?:/{_PATH})*(?::[\w][\w.-]{{0,127}})?"
    r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?$"
)
logger = logging.getLogger("dspex_jupyter.kernelspecs")


@dataclass(frozen=True)
class RemoteKernelspec:
    """A kernelspec dspex wrote: use it as ``PoolSpec(name, kernel=spec.name)``."""

    name: str
    kind: str
    path: Path
    spec: dict[str, Any]

    @property
    def provisioner(self) -> str:
        return str(self.spec["metadata"]["kernel_provisioner"]["provisioner_name"])


# --------------------------------------------------------------------------------------
# Checks: every bad input is a KernelspecError saying which option and what to give


def _check_kernel_name(name: Any) -> str:
    if not isinstance(name, str) or not _KERNEL_NAME.match(name):
        raise KernelspecError(
            f"invalid kernelspec name {name!r}",
            hint="use 1-64 lowercase letters, digits, '_', '.' or '-', starting with a "
            "letter or digit (Jupyter lowercases kernel names)",
        )
    return name


def _check_hosts(hosts: Any) -> list[str]:
    if isinstance(hosts, str):
        hosts = hosts.split(",")
    found = [h.strip() for h in (hosts or []) if isinstance(h, str) and h.strip()]
    if not found:
        raise KernelspecError(
            "an SSH kernelspec needs at least one host",
            hint="give the hosts kernels may start on: --hosts gpu1,gpu2 (hosts=[...])",
        )
    bad = [h for h in found if not _HOST.match(h)]
    if bad:
        raise KernelspecError(
            f"invalid host name(s): {', '.join(map(repr, bad))}",
            hint="give host names or IP addresses, separated by commas: --hosts gpu1,10.0.0.7",
        )
    return list(dict.fromkeys(found))  # each once, order kept


def _check_image(image: Any) -> str:
    if not isinstance(image, str) or not image.strip():
        raise KernelspecError(
            "a container kernelspec needs an image",
            hint="give the image with the dspex runtime in it: --image "
            "registry.example.com/team/dspex-kernel:1.0 (README: Kernels on a cluster)",
        )
    if not _IMAGE.match(image) or len(image) > 255:
        raise KernelspecError(
            f"invalid image reference {image!r}",
            hint="use [registry[:port]/]name[:tag][@sha256:digest] with a lowercase name, "
            "e.g. ghcr.io/team/dspex-kernel:1.0",
        )
    return image


def _check_namespace(namespace: Any) -> None:
    if namespace is not None and (
        not isinstance(namespace, str) or not _NAMESPACE.match(namespace)
    ):
        raise KernelspecError(
            f"invalid Kubernetes namespace {namespace!r}",
            hint="use up to 63 lowercase letters, digits and '-' (an RFC 1123 label)",
        )


def _check_ip(value: Any, option: str) -> str | None:
    if value is None:
        return None
    try:
        return str(ipaddress.ip_address(str(value)))
    except ValueError:
        raise KernelspecError(
            f"{option} {value!r} is not an IP address",
            hint=f"give an address of this machine the kernels can reach, e.g. {option} "
            "10.0.0.5 (127.0.0.1 for hosts on this machine)",
        ) from None


def _check_policy(policy: Any) -> str:
    if policy not in ENCRYPTION_POLICIES:
        raise KernelspecError(
            f"unknown transport encryption {policy!r}",
            hint=f"use one of: {', '.join(ENCRYPTION_POLICIES)} (required is the default)",
        )
    return str(policy)


def _check_timeout(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise KernelspecError(
            f"launch timeout must be a positive number of seconds, got {value!r}",
            hint="e.g. --launch-timeout 120 for hosts that are slow to start a kernel",
        )
    return value


def _remote_python(env: str | None, remote_python: str | None, home: Path) -> str:
    """The Python an SSH host runs: ``remote_python``, else the environment's at the same
    path (a shared file system, or an environment made at the same path on every host)."""
    if remote_python is not None:
        if not isinstance(remote_python, str) or not remote_python.startswith("/"):
            raise KernelspecError(
                f"--remote-python must be an absolute path on the hosts, got {remote_python!r}",
                hint="e.g. --remote-python /opt/envs/mipro/bin/python",
            )
        if env is not None:
            get_environment(env, home)  # named: it must exist (EnvironmentNotFound)
        return remote_python
    if env is None:
        raise KernelspecError(
            "an SSH kernelspec needs the Python to run on the hosts",
            hint="give --env NAME (a dspex environment at the same path on the hosts) or "
            "--remote-python /path/on/the/hosts/bin/python",
        )
    return str(get_environment(env, home).python)


# What the SSH host's Python must import: the launcher (gateway_provisioners, its response
# encryption) and the kernel with the dspex runtime.
HOST_MODULES = ("gateway_provisioners", "Cryptodome", "ipykernel", "dspex_jupyter.runtime")
HOST_PACKAGES = ("gateway-provisioners==0.5.0",)


def _check_host_python(python: str) -> None:
    """When the hosts' Python is also here (a shared file system, or these tests), check it
    can run the launcher now rather than at the first kernel start; a path that exists only
    on the hosts is taken as given."""
    if not os.access(python, os.X_OK):
        return
    probe = "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]"
    try:
        result = subprocess.run([python, "-c", probe, *HOST_MODULES], capture_output=True,
                                text=True, timeout=120, check=False)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KernelspecError(f"cannot run the hosts' Python {python}: {exc}") from None
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise KernelspecError(
            f"the hosts' Python {python} cannot run the SSH kernel launcher: {last}",
            hint=f"install {' '.join(HOST_PACKAGES)} there ({python} -m pip install "
            f"{' '.join(HOST_PACKAGES)}); `dspex env create NAME --remote ssh` does it",
        )


# --------------------------------------------------------------------------------------
# Writing


def _as_home(home: str | Path | None) -> Path:
    return dspex_home() if home is None else Path(os.path.abspath(os.path.expanduser(home)))


def _private_dirs(path: Path) -> None:
    """Create ``path`` and its missing parents 0700 (existing ones are left as they are)."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        folder.mkdir(mode=0o700, exist_ok=True)
        os.chmod(folder, 0o700)  # mkdir's mode is filtered by the umask


def _installer(kind: str) -> Any:
    """gateway_provisioners' kernelspec generator for ``kind``."""
    try:
        if kind == "ssh":
            from gateway_provisioners.cli.ssh_specapp import SshSpecInstaller as installer
        elif kind == "k8s":
            from gateway_provisioners.cli.k8s_specapp import K8sSpecInstaller as installer
        else:
            from gateway_provisioners.cli.docker_specapp import DockerSpecInstaller as installer
    except ImportError as exc:
        extra = "remote" if kind == "ssh" else "cluster"
        raise KernelspecError(
            f"gateway_provisioners is not installed here ({exc})",
            hint=f'pip install "dspex-jupyter[{extra}]" in the notebook\'s environment',
        ) from None
    return installer


def _generate(kind: str, name: str, home: Path, traits: dict[str, Any]) -> Path:
    """Run gateway_provisioners' generator into HOME/share/jupyter/kernels/NAME."""
    installer = _installer(kind)(
        kernel_name=name,
        prefix=str(home),
        replace=True,
        kernel_spec_manager=kernel_spec_manager(home),
        ipykernel_subclass_name=KERNEL_CLASS,
        log_level=logging.WARNING,
        **traits,
    )
    try:
        installer.start()
    except SystemExit as exc:  # its installers report bad options by exiting
        raise KernelspecError(
            f"gateway_provisioners could not write kernelspec {name!r}: {exc}",
            hint="check the options the message names",
        ) from None
    folder = kernels_dir(home) / name
    if not (folder / "kernel.json").is_file():
        raise KernelspecError(
            f"gateway_provisioners wrote no kernel.json in {folder}",
            hint="run with --debug-level or report this as a dspex bug",
        )
    return folder


def _write_json_private(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _write(
    kind: str,
    name: str,
    home: str | Path | None,
    replace: bool,
    display_name: str | None,
    traits: dict[str, Any],
    python: str,
    dspex: dict[str, Any],
    env: dict[str, str],
    config: dict[str, Any],
) -> RemoteKernelspec:
    root = _as_home(home)
    target = kernels_dir(root) / name
    if target.exists() and not replace:
        raise KernelspecError(
            f"a kernelspec named {name!r} already exists: {target}",
            hint="choose another name, or pass --replace (replace=True) to overwrite it",
        )
    _private_dirs(kernels_dir(root))
    staging = kernels_dir(root) / f".{name}.writing"
    shutil.rmtree(staging, ignore_errors=True)
    # Generated under a hidden name, then moved in whole: a pool never sees half of one.
    folder = _generate(kind, staging.name, root, {"display_name": display_name or name, **traits})
    try:
        spec_file = folder / "kernel.json"
        spec = json.loads(spec_file.read_text(encoding="utf-8"))
        # The generator wrote paths under the staging name; they move with the folder.
        spec["argv"] = [a.replace(str(staging), str(target)) for a in spec["argv"]]
        spec["argv"][0] = python
        if kind == "ssh":  # gateway_provisioners' launcher, run from the host's own install
            spec["argv"][1:2] = ["-m", SSH_LAUNCHER]
        spec.setdefault("env", {}).update(env)
        metadata = spec.setdefault("metadata", {})
        metadata["kernel_provisioner"].setdefault("config", {}).update(config)
        metadata["dspex"] = {"remote": kind, **dspex}
        _write_json_private(spec_file, spec)
        for path in [folder, *folder.rglob("*")]:
            os.chmod(path, 0o700 if path.is_dir() else 0o600)
        if target.exists():
            shutil.rmtree(target)
        os.replace(folder, target)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return RemoteKernelspec(name, kind, target, spec)


def write_ssh_kernelspec(
    name: str,
    *,
    hosts: Iterable[str] | str,
    env: str | None = None,
    remote_python: str | None = None,
    user: str | None = None,
    port: int | None = None,
    response_ip: str | None = DEFAULT_SSH_RESPONSE_IP,
    transport_encryption: str = "required",
    allow_root: bool = False,
    launch_timeout: int | None = None,
    display_name: str | None = None,
    home: str | Path | None = None,
    replace: bool = False,
) -> RemoteKernelspec:
    """A kernelspec whose kernels gateway_provisioners starts over SSH on one of ``hosts``
    (round-robin), running environment ``env``'s Python there (or ``remote_python``).

    ``user``/``port``: the SSH login (default: this user, port 22). ``response_ip``: the
    address of this machine the hosts send the kernel's connection info to.
    ``allow_root``: gateway_provisioners refuses to start kernels for root unless told.
    """
    name = _check_kernel_name(name)
    root = _as_home(home)
    dspex = _ssh_settings(hosts, user, port, response_ip, transport_encryption)
    timeout = _check_timeout(launch_timeout)
    python = _remote_python(env, remote_python, root)  # last: it may look env up
    _check_host_python(python)
    dspex = {"env": env, "python": python, **dspex}
    traits: dict[str, Any] = {"remote_hosts": dspex["hosts"]}
    if timeout is not None:
        traits["launch_timeout"] = timeout
    config = {"remote_hosts": dspex["hosts"], **({"unauthorized_users": []} if allow_root else {})}
    return _write("ssh", name, root, replace, display_name, traits, python, dspex, {}, config)


def _ssh_settings(
    hosts: Any, user: Any, port: Any, response_ip: Any, transport_encryption: Any
) -> dict[str, Any]:
    """The checked SSH options, as metadata.dspex records them."""
    host_list = _check_hosts(hosts)
    if user is not None and (not isinstance(user, str) or not _USER.match(user)):
        raise KernelspecError(f"invalid SSH user {user!r}", hint="give a login name: --user alice")
    if port is not None and (
        isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536
    ):
        raise KernelspecError(
            f"invalid SSH port {port!r}", hint="give a port number from 1 to 65535: --port 2222"
        )
    return {
        "hosts": host_list,
        "ssh_user": user,
        "ssh_port": port,
        "response_ip": _check_ip(response_ip, "--response-ip"),
        "transport_encryption": _check_policy(transport_encryption),
    }


def check_remote_options(kind: str, **options: Any) -> None:
    """Check a remote kernelspec's options without writing it (``dspex env create
    --remote`` checks them before the slow part): the KernelspecError a write would raise,
    except about the environment, which does not exist yet."""
    if kind not in KINDS:
        raise KernelspecError(
            f"unknown kind of remote kernelspec {kind!r}", hint=f"use one of: {', '.join(KINDS)}"
        )
    _check_timeout(options.get("launch_timeout"))
    if kind == "ssh":
        _ssh_settings(
            options.get("hosts"),
            options.get("user"),
            options.get("port"),
            options.get("response_ip", DEFAULT_SSH_RESPONSE_IP),
            options.get("transport_encryption", "required"),
        )
        return
    _check_image(options.get("image"))
    _check_namespace(options.get("namespace"))
    _check_ip(options.get("response_ip"), "--response-ip")
    _check_policy(options.get("transport_encryption", "required"))


def write_k8s_kernelspec(
    name: str,
    *,
    image: str,
    namespace: str | None = None,
    response_ip: str | None = None,
    transport_encryption: str = "required",
    allow_root: bool = False,
    launch_timeout: int | None = None,
    display_name: str | None = None,
    home: str | Path | None = None,
    replace: bool = False,
) -> RemoteKernelspec:
    """A kernelspec whose kernels run as pods of ``image`` (which holds the dspex runtime:
    README, "Kernels on a cluster"), in ``namespace`` (default: gateway_provisioners' shared
    one). ``response_ip``: an address of this machine the pods reach (default: the one
    gateway_provisioners picks, this machine's first public address)."""
    name = _check_kernel_name(name)
    image = _check_image(image)
    _check_namespace(namespace)
    return _container_spec("k8s", name, image, namespace, response_ip, transport_encryption,
                           allow_root, launch_timeout, display_name, home, replace)  # fmt: skip


def write_docker_kernelspec(
    name: str,
    *,
    image: str,
    response_ip: str | None = None,
    transport_encryption: str = "required",
    allow_root: bool = False,
    launch_timeout: int | None = None,
    display_name: str | None = None,
    home: str | Path | None = None,
    replace: bool = False,
) -> RemoteKernelspec:
    """A kernelspec whose kernels run as Docker containers of ``image`` (see
    ``write_k8s_kernelspec``)."""
    name = _check_kernel_name(name)
    image = _check_image(image)
    return _container_spec("docker", name, image, None, response_ip, transport_encryption,
                           allow_root, launch_timeout, display_name, home, replace)  # fmt: skip


def _container_spec(
    kind: str,
    name: str,
    image: str,
    namespace: str | None,
    response_ip: str | None,
    transport_encryption: str,
    allow_root: bool,
    launch_timeout: int | None,
    display_name: str | None,
    home: str | Path | None,
    replace: bool,
) -> RemoteKernelspec:
    dspex = {
        "image": image,
        "namespace": namespace,
        "python": sys.executable,
        "response_ip": _check_ip(response_ip, "--response-ip"),
        "transport_encryption": _check_policy(transport_encryption),
    }
    traits: dict[str, Any] = {"image_name": image}
    timeout = _check_timeout(launch_timeout)
    if timeout is not None:
        traits["launch_timeout"] = timeout
    # gateway_provisioners' container launchers read these from the kernel's environment.
    env = {"KERNEL_NAMESPACE": namespace} if namespace else {}
    config = {"image_name": image, **({"unauthorized_users": []} if allow_root else {})}
    return _write(kind, name, home, replace, display_name, traits, sys.executable, dspex, env,
                  config)  # fmt: skip


def write_kernelspec(kind: str, name: str, **options: Any) -> RemoteKernelspec:
    """``write_ssh_kernelspec``, ``write_k8s_kernelspec`` or ``write_docker_kernelspec`` by
    ``kind`` (``"ssh"``, ``"k8s"``, ``"docker"``)."""
    writers = {
        "ssh": write_ssh_kernelspec,
        "k8s": write_k8s_kernelspec,
        "docker": write_docker_kernelspec,
    }
    if kind not in writers:
        raise KernelspecError(
            f"unknown kind of remote kernelspec {kind!r}", hint=f"use one of: {', '.join(KINDS)}"
        )
    return writers[kind](name, **options)


# --------------------------------------------------------------------------------------
# Listing and removing


def remote_kernelspecs(home: str | Path | None = None) -> list[RemoteKernelspec]:
    """The remote kernelspecs in dspex's kernelspec folder, sorted by name."""
    root = _as_home(home)
    manager = kernel_spec_manager(root)
    found = []
    for name, folder in sorted(manager.find_kernel_specs().items()):
        try:
            spec = json.loads((Path(folder) / "kernel.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        dspex = (spec.get("metadata") or {}).get("dspex") or {}
        if dspex.get("remote") in KINDS:
            found.append(RemoteKernelspec(name, dspex["remote"], Path(folder), spec))
    return found


def remove_kernelspec(name: str, home: str | Path | None = None) -> None:
    """Remove remote kernelspec NAME (an environment's own kernelspec goes with
    ``dspex env remove``)."""
    name = _check_kernel_name(name)
    root = _as_home(home)
    known = {spec.name: spec for spec in remote_kernelspecs(root)}
    if name not in known:
        try:
            kernel_spec_manager(root).get_kernel_spec(name)
        except NoSuchKernel:
            raise KernelspecError(
                f"no remote kernelspec named {name!r} in {kernels_dir(root)}",
                hint="see them with: dspex kernelspec list",
            ) from None
        raise KernelspecError(
            f"kernelspec {name!r} is not a remote kernelspec dspex wrote",
            hint="an environment's kernelspec goes with: dspex env remove NAME",
        )
    shutil.rmtree(known[name].path)
