"""Real Jupyter gateways on this machine, for pools of kernels behind a gateway (issue #17).

Enterprise Gateway 3.3.0 and Kernel Gateway 3.0.1 each run from a virtual environment of their
own (``.gateways/eg``, ``.gateways/kg``, made by scripts/gateway_setup.sh: EG pins
jupyter_client<7, which cannot share .venv). A ``GatewayServer`` starts one on 127.0.0.1 with a
free port, a random token, its own JUPYTER_PATH / runtime / data / config folders (0700) and a
kernelspec whose kernel runs this Python (dspex_jupyter installed); its log goes to a file.

Used by tests/integration/test_gateway*.py and, outside pytest, by bench/bench_gateway.py:

    with GatewayServer("kg", folder) as gw:       # started, answering with its token
        PoolSpec("gw", gateway=gw.url, kernel=gw.kernel_name, auth_token=gw.token)
        gw.stop(); gw.start()                      # a gateway restart, same port and token

Kernels are not in the gateway's process group (jupyter_client starts each in a session of its
own), so ``stop()`` lists the gateway's descendants before signalling it and kills whatever
of them outlives it: nothing is left running.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
GATEWAYS_DIR = Path(os.environ.get("DSPEX_TEST_GATEWAYS", REPO / ".gateways"))
HOST = "127.0.0.1"
KERNEL_NAME = "dspex-python"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
# Both gateways log this line once their HTTP server listens.
READY_LINE = "is available at"


@dataclass(frozen=True)
class GatewayKind:
    """How one gateway product is started and configured (its traitlets differ)."""

    label: str
    executable: str
    app: str  # the application class whose traits take the token, ip, port and TLS files
    kernel_manager: str  # the class whose traits set culling
    allowed_envs_trait: str  # client env vars besides KERNEL_* the gateway passes to kernels
    list_kernels_trait: str
    token_env: str  # the variable the gateway reads its token from (not the command line: ps)
    extra_args: tuple[str, ...] = ()


KINDS: dict[str, GatewayKind] = {
    "eg": GatewayKind(
        label="Jupyter Enterprise Gateway 3.3.0",
        executable="jupyter-enterprisegateway",
        app="EnterpriseGatewayApp",
        kernel_manager="RemoteMappingKernelManager",
        allowed_envs_trait="EnterpriseGatewayApp.client_envs",
        list_kernels_trait="EnterpriseGatewayApp.list_kernels",
        token_env="EG_AUTH_TOKEN",
        # EG refuses kernels to the users in unauthorized_users, {'root'} by default, and
        # this machine (and CI) runs as root.
        extra_args=("--EnterpriseGatewayApp.unauthorized_users=set()",),
    ),
    "kg": GatewayKind(
        label="Jupyter Kernel Gateway 3.0.1",
        executable="jupyter-kernelgateway",
        app="KernelGatewayApp",
        kernel_manager="MappingKernelManager",
        allowed_envs_trait="JupyterWebsocketPersonality.env_whitelist",
        list_kernels_trait="JupyterWebsocketPersonality.list_kernels",
        token_env="KG_AUTH_TOKEN",
        # The default api (kernel_gateway.jupyter_websocket) is Jupyter's kernel REST and
        # websocket API; notebook-http would be something else entirely.
        extra_args=("--KernelGatewayApp.allow_origin=*",),
    ),
}


def executable(kind: str) -> Path:
    return GATEWAYS_DIR / kind / "bin" / KINDS[kind].executable


def missing_reason(kind: str) -> str | None:
    """Why gateway ``kind`` cannot run here, or None."""
    if not os.access(executable(kind), os.X_OK):
        return (
            f"{KINDS[kind].label} is not installed ({executable(kind)} is missing): run "
            "scripts/setup.sh, which makes .gateways/ with scripts/gateway_setup.sh"
        )
    return None


def free_port(ip: str = HOST) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def write_self_signed_cert(folder: Path, ip: str = HOST) -> tuple[Path, Path]:
    """A self-signed certificate for ``ip`` (and localhost) and its key (0600).

    The certificate is its own CA (basicConstraints CA, keyCertSign), so a client trusts the
    gateway by loading it as ``cafile``; hostname checking stays on."""
    cert_path, key_path = folder / "gateway-cert.pem", folder / "gateway-key.pem"
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:  # the openssl CLI does the same job
        _openssl_self_signed(cert_path, key_path, ip)
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dspex test gateway")])
    now = datetime.datetime.now(datetime.timezone.utc)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(ip)), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key_bytes)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def _openssl_self_signed(cert_path: Path, key_path: Path, ip: str) -> None:
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-days", "2", "-subj", "/CN=dspex test gateway",
            "-addext", f"subjectAltName=IP:{ip},DNS:localhost",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,digitalSignature,keyCertSign",
            "-keyout", str(key_path), "-out", str(cert_path),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    os.chmod(key_path, 0o600)


@dataclass
class GatewayServer:
    """One gateway process on 127.0.0.1 (see the module docstring).

    ``kind`` is "eg" or "kg"; ``tls`` serves https/wss with a self-signed certificate
    (``ca_cert``); ``cull_idle_timeout`` (seconds) makes the gateway cull idle kernels, checked
    every second, and ``cull_connected`` culls them even while a websocket is open (both
    gateways spare connected kernels by default); ``allowed_envs`` are the env vars besides
    ``KERNEL_*`` the gateway passes from a kernel request to the kernel (none by default, as
    a gateway configured by someone else would). Kernels start in ``kernel_cwd`` (this
    process's working directory by default, as a local pool's kernels do, so that modules of
    the repository such as ``bench.noop`` import there)."""

    kind: str
    folder: Path
    tls: bool = False
    cull_idle_timeout: int | None = None
    cull_connected: bool = False
    allowed_envs: tuple[str, ...] = ()
    kernel_cwd: Path = field(default_factory=Path.cwd)
    port: int = 0
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    kernel_name: str = KERNEL_NAME
    ca_cert: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    _key_file: Path | None = None
    _leftovers: list[psutil.Process] = field(default_factory=list)
    # Notified by the log copier after each line it writes (wait_for_log waits on it).
    _log_written: threading.Condition = field(default_factory=threading.Condition)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"gateway kind must be one of {sorted(KINDS)}, not {self.kind!r}")
        self.folder = _private_dir(Path(self.folder))
        self.port = self.port or free_port()
        for sub in ("runtime", "data", "config", "kernel-dspex-home", "kernel-tmp"):
            _private_dir(self.folder / sub)
        self._write_kernelspec()
        if self.tls:
            self.ca_cert, self._key_file = write_self_signed_cert(self.folder)

    # ---- what a client needs ------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{HOST}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"{'wss' if self.tls else 'ws'}://{HOST}:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"}

    @property
    def log_path(self) -> Path:
        return self.folder / "gateway.log"

    def ssl_context(self) -> ssl.SSLContext | None:
        """A client context trusting only this gateway's certificate (None without TLS)."""
        if self.ca_cert is None:
            return None
        return ssl.create_default_context(cafile=str(self.ca_cert))

    def get(self, path: str, token: str | None = None, timeout: float = 10.0) -> int:
        """The HTTP status of GET ``path`` with ``token`` (this gateway's when None)."""
        request = urllib.request.Request(
            self.url + path,
            headers={"Authorization": f"token {self.token if token is None else token}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout, context=self.ssl_context()) as r:
                return int(r.status)
        except urllib.error.HTTPError as error:
            return int(error.code)

    def kernel_processes(self) -> list[psutil.Process]:
        """The kernels this gateway runs now (its descendants running ipykernel)."""
        if self.process is None:
            return []
        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        return [p for p in children if _is_kernel(p)]

    def wait_for_log(self, predicate: Callable[[str], bool], timeout: float = 10.0) -> str:
        """The whole log once ``predicate(log_text)`` holds: the log is copied from the
        gateway's output by a thread, so a line logged after a response can land after the
        client saw the response. Raises TimeoutError with the log's tail otherwise."""
        with self._log_written:
            if self._log_written.wait_for(lambda: predicate(self.log_tail(10**9)), timeout):
                return self.log_tail(10**9)
        raise TimeoutError(f"the gateway's log never showed it:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Start the gateway (again, on the same port with the same token, after ``stop``)
        and return once it answers HTTP requests with its token."""
        if self.process is not None and self.process.poll() is None:
            return
        available = threading.Event()
        self.process = subprocess.Popen(
            self._command(),
            env=self._environment(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.kernel_cwd,  # the gateways start kernels in their own working directory
        )
        threading.Thread(
            target=_copy_log,
            args=(self.process, self.log_path, available, self._log_written),
            daemon=True,
        ).start()
        if not available.wait(START_TIMEOUT_S) or self.process.poll() is not None:
            self.stop()
            raise RuntimeError(f"{KINDS[self.kind].label} did not start:\n{self.log_tail()}")
        # The line is logged as the server starts listening: one request confirms it serves.
        status = self.get("/api/kernelspecs", timeout=START_TIMEOUT_S)
        if status != 200:
            self.stop()
            raise RuntimeError(f"gateway answered {status} to its own token:\n{self.log_tail()}")

    def stop(self) -> None:
        """Stop the gateway and every kernel it started; nothing of it stays running."""
        process, self.process = self.process, None
        if process is None:
            return
        with contextlib.suppress(psutil.NoSuchProcess):
            self._leftovers += psutil.Process(process.pid).children(recursive=True)
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # both gateways shut their kernels down
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT_S)
        self._reap_leftovers()

    def crash(self) -> None:
        """SIGKILL the gateway alone, as a crash would: its kernels are orphaned (ipykernel
        ends them when it sees its parent gone); ``stop`` or ``close`` kills any still alive."""
        if self.process is None:
            return
        with contextlib.suppress(psutil.NoSuchProcess):
            self._leftovers += psutil.Process(self.process.pid).children(recursive=True)
        self.process.kill()
        self.process.wait(STOP_TIMEOUT_S)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        self._reap_leftovers()

    def __enter__(self) -> GatewayServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---- internals ----------------------------------------------------------------------
    def _reap_leftovers(self) -> None:
        alive = [p for p in self._leftovers if _still_running(p)]
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=STOP_TIMEOUT_S)
        self._leftovers = []

    def _write_kernelspec(self) -> None:
        """A kernelspec running this Python; EG reads its process proxy, KG ignores it."""
        folder = _private_dir(self.folder / "jupyter" / "kernels" / self.kernel_name)
        spec = {
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": f"dspex Python ({self.kind.upper()} test)",
            "language": "python",
            # Kernel-side files (run folders, temp files) stay in the gateway's folder:
            # neither this machine's ~/.dspex nor /tmp.
            "env": {
                "DSPEX_HOME": str(self.folder / "kernel-dspex-home"),
                "TMPDIR": str(self.folder / "kernel-tmp"),
                "LITELLM_LOCAL_MODEL_COST_MAP": "true",
            },
            "metadata": {
                "process_proxy": {
                    "class_name": "enterprise_gateway.services.processproxies.processproxy."
                    "LocalProcessProxy"
                }
            },
        }
        (folder / "kernel.json").write_text(json.dumps(spec, indent=1))

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            JUPYTER_PATH=str(self.folder / "jupyter"),
            JUPYTER_RUNTIME_DIR=str(self.folder / "runtime"),
            JUPYTER_DATA_DIR=str(self.folder / "data"),
            JUPYTER_CONFIG_DIR=str(self.folder / "config"),
            JUPYTER_PLATFORM_DIRS="1",
        )
        env[KINDS[self.kind].token_env] = self.token
        # The gateway's own venv, never this one's (its jupyter_client would be 8.x for EG).
        for name in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):
            env.pop(name, None)
        return env

    def _command(self) -> list[str]:
        kind = KINDS[self.kind]
        args = [
            str(executable(self.kind)),
            f"--{kind.app}.ip={HOST}",
            f"--{kind.app}.port={self.port}",
            f"--{kind.app}.port_retries=0",
            f"--{kind.app}.default_kernel_name={self.kernel_name}",
            f"--{kind.list_kernels_trait}=True",
            # The gateways' own venvs have no ipykernel: don't offer a "python3" kernel.
            "--KernelSpecManager.ensure_native_kernel=False",
            *kind.extra_args,
        ]
        if self.allowed_envs:
            args.append(f"--{kind.allowed_envs_trait}={list(self.allowed_envs)!r}")
        if self.cull_idle_timeout is not None:
            args += [
                f"--{kind.kernel_manager}.cull_idle_timeout={self.cull_idle_timeout}",
                f"--{kind.kernel_manager}.cull_interval=1",
                f"--{kind.kernel_manager}.cull_connected={self.cull_connected}",
            ]
        if self.tls:
            args += [
                f"--{kind.app}.certfile={self.ca_cert}",
                f"--{kind.app}.keyfile={self._key_file}",
            ]
        return args


def _copy_log(
    process: subprocess.Popen[bytes],
    path: Path,
    available: threading.Event,
    written: threading.Condition,
) -> None:
    """Copy the gateway's output to its log file; set ``available`` once it listens (or
    once it exits, which ``start`` then reports); notify ``written`` after each line."""
    stream = process.stdout
    assert stream is not None
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "ab", buffering=0) as log:
        for line in stream:
            log.write(line)
            if READY_LINE.encode() in line:
                available.set()
            with written:
                written.notify_all()
    available.set()


def _is_kernel(proc: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return "ipykernel_launcher" in " ".join(proc.cmdline())
    return False


def _still_running(proc: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    return False


# ---- pytest fixtures ------------------------------------------------------------------------
@contextlib.contextmanager
def running_gateway(kind: str, folder: Path, **options: object) -> Iterator[GatewayServer]:
    """A started gateway, skipping the test when ``kind`` is not installed here."""
    reason = missing_reason(kind)
    if reason:
        pytest.skip(reason)
    with GatewayServer(kind, folder, **options) as server:  # type: ignore[arg-type]
        yield server


@pytest.fixture(scope="module")
def kernel_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    """Kernel Gateway 3.0.1 on http://127.0.0.1, shared by a module's tests."""
    with running_gateway("kg", tmp_path_factory.mktemp("kg")) as server:
        yield server


@pytest.fixture(scope="module")
def enterprise_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    """Enterprise Gateway 3.3.0 (LocalProcessProxy kernels) on http://127.0.0.1."""
    with running_gateway("eg", tmp_path_factory.mktemp("eg")) as server:
        yield server


@pytest.fixture(scope="module")
def tls_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    """Enterprise Gateway behind TLS (https/wss) with a self-signed certificate for
    127.0.0.1: clients trust ``server.ca_cert``."""
    with running_gateway("eg", tmp_path_factory.mktemp("eg-tls"), tls=True) as server:
        yield server


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[Callable[..., GatewayServer]]:
    """Start gateways with any options inside one test: ``gateway_factory("kg",
    cull_idle_timeout=2)``; every one is stopped, with its kernels, after the test."""
    started: list[GatewayServer] = []

    def make(kind: str = "kg", **options: object) -> GatewayServer:
        reason = missing_reason(kind)
        if reason:
            pytest.skip(reason)
        server = GatewayServer(kind, tmp_path / f"{kind}-{len(started)}", **options)  # type: ignore[arg-type]
        started.append(server)
        server.start()
        return server

    yield make
    for server in started:
        server.close()


@pytest.fixture
def restartable_gateway(gateway_factory: Callable[..., GatewayServer]) -> GatewayServer:
    """A Kernel Gateway of the test's own, which the test may ``stop()``/``start()``/
    ``crash()`` (same url and token after a restart)."""
    return gateway_factory("kg")


@pytest.fixture
def culling_gateway(gateway_factory: Callable[..., GatewayServer]) -> GatewayServer:
    """A Kernel Gateway of the test's own that culls kernels idle for 2 s, connected or not."""
    return gateway_factory("kg", cull_idle_timeout=2, cull_connected=True)
