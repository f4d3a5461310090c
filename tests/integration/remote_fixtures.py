"""A real SSH host on this machine, for pools of kernels launched by gateway_provisioners.

``sshd`` (Debian's openssh-server, installed by scripts/setup.sh) listens on 127.0.0.2 with
a host key and a user key made for the run; 127.0.0.2 is not among the addresses
gateway_provisioners treats as local, so every kernel start is a real SSH login. A second
virtual environment stands for the remote host's Python. The kernelspec is written by
dspex's own ``write_ssh_kernelspec`` (gateway_provisioners' ``ssh-spec`` generator inside).

Used by tests/integration/test_remote_ssh.py and, outside pytest, by bench/bench_remote.py:

    with remote_fixtures.ssh_host(workdir) as host:      # sshd, keys, remote venv
        with host.client_env():                           # HOME with the keys, GP settings
            name = host.write_kernelspec(dspex_home, "ssh-test")
            PoolManager([PoolSpec("gpu", kernel=name, size=2)])
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SSHD = os.environ.get("DSPEX_TEST_SSHD", "/usr/sbin/sshd")
HOST_IP = "127.0.0.2"
RESPONSE_IP = "127.0.0.1"
START_TIMEOUT_S = 30.0
# A Python the tests may use as the remote host's instead of making one (e.g. a CI cache).
REMOTE_PYTHON_ENV = "DSPEX_TEST_REMOTE_PYTHON"


def missing_reason() -> str | None:
    """Why the SSH tests cannot run here, or None."""
    for tool in (SSHD, shutil.which("ssh-keygen"), shutil.which("ssh-keyscan")):
        if not tool or not os.access(tool, os.X_OK):
            return (
                "openssh-server is not installed (no /usr/sbin/sshd or ssh-keygen): run "
                "scripts/setup.sh, which installs Debian's openssh-server"
            )
    return None


def _free_port(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "dspex-test", "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
    )


def make_remote_python(folder: Path) -> Path:
    """The remote host's Python: a virtual environment of its own (its own interpreter,
    prefix and ``sys.executable``) holding the same packages as this one's.

    Installing dspy, pyarrow and gateway_provisioners afresh takes about 5 minutes here, so
    the packages come from this environment's site-packages through a ``.pth`` (as a host
    would have the same environment mounted); ``DSPEX_TEST_REMOTE_PYTHON`` names a fully
    separate Python instead."""
    given = os.environ.get(REMOTE_PYTHON_ENV)
    if given:
        return Path(given)
    venv = folder / "remote-venv"
    python = venv / "bin" / "python"
    if python.exists():
        return python
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    here = sysconfig.get_paths()["purelib"]
    Path(purelib, "dspex_test_packages.pth").write_text(f"import site; site.addsitedir({here!r})\n")
    return python


@dataclass
class SshHost:
    """A running sshd on ``ip:port`` that lets ``user`` in with ``user_key``."""

    folder: Path
    ip: str
    port: int
    user: str
    home: Path  # a HOME whose ~/.ssh has the user key and known_hosts (paramiko reads it)
    python: Path
    process: subprocess.Popen[bytes] | None = None
    config: Path = field(default_factory=Path)
    log: list[str] = field(default_factory=list)

    # ---- sshd ----------------------------------------------------------------------
    def start(self) -> None:
        """Start sshd and return once it listens (it logs "Server listening on")."""
        listening = threading.Event()
        self.process = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(self.config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        stream = self.process.stderr
        assert stream is not None

        def read() -> None:
            for line in stream:
                self.log.append(line.rstrip())
                if "Server listening on" in line:
                    listening.set()
            listening.set()  # exited: start() reports it

        threading.Thread(target=read, daemon=True).start()
        if not listening.wait(START_TIMEOUT_S) or self.process.poll() is not None:
            raise RuntimeError("sshd did not start:\n" + "\n".join(self.log[-20:]))

    def stop(self) -> None:
        """Stop the sshd daemon (running kernels keep their own TCP channels)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None

    def ssh(self, command: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run ``command`` on the host over a real SSH login."""
        return subprocess.run(
            [
                "ssh",
                "-F",
                "/dev/null",
                "-p",
                str(self.port),
                "-i",
                str(self.home / ".ssh" / "id_ed25519"),
                "-o",
                f"UserKnownHostsFile={self.home / '.ssh' / 'known_hosts'}",
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                "BatchMode=yes",
                f"{self.user}@{self.ip}",
                command,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    # ---- the notebook side -----------------------------------------------------------
    @contextlib.contextmanager
    def client_env(self) -> Iterator[None]:
        """This process set up as the notebook machine: HOME whose ~/.ssh paramiko reads,
        and gateway_provisioners' response listener on loopback only."""
        saved = {k: os.environ.get(k) for k in ("HOME", "GP_RESPONSE_IP", "GP_KERNEL_LOG_DIR")}
        os.environ["HOME"] = str(self.home)
        os.environ["GP_RESPONSE_IP"] = RESPONSE_IP
        os.environ["GP_KERNEL_LOG_DIR"] = str(self.folder)
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def write_kernelspec(self, dspex_home: str | Path, name: str = "ssh-test") -> str:
        """An SSH kernelspec for this host under ``dspex_home`` (where pools look)."""
        from dspex_jupyter.core.kernelspecs import write_ssh_kernelspec

        spec = write_ssh_kernelspec(
            name,
            hosts=[self.ip],
            remote_python=str(self.python),
            user=self.user,
            port=self.port,
            response_ip=RESPONSE_IP,
            allow_root=True,
            launch_timeout=60,
            home=dspex_home,
            replace=True,
        )
        # The host's temp folder (the launcher's connection files, left by killed kernels) is
        # the run's: nothing of the run stays in this machine's /tmp or home.
        path = Path(spec.path) / "kernel.json"
        data = json.loads(path.read_text())
        data.setdefault("env", {})["TMPDIR"] = str(self.folder / "host-tmp")
        # The host's dspex home too (kernel-side run folders): not this machine's ~/.dspex.
        data["env"]["DSPEX_HOME"] = str(self.folder / "host-dspex-home")
        (self.folder / "host-tmp").mkdir(mode=0o700, exist_ok=True)
        path.write_text(json.dumps(data, indent=1))
        return spec.name


def _write_config(host: SshHost) -> None:
    folder = host.folder
    _keygen(folder / "host_key")
    ssh_dir = host.home / ".ssh"
    ssh_dir.mkdir(mode=0o700, parents=True)
    _keygen(ssh_dir / "id_ed25519")
    authorized = folder / "authorized_keys"
    shutil.copy(ssh_dir / "id_ed25519.pub", authorized)
    os.chmod(authorized, 0o600)
    host.config = folder / "sshd_config"
    host.config.write_text(
        "\n".join(
            [
                f"ListenAddress {host.ip}:{host.port}",
                f"HostKey {folder / 'host_key'}",
                f"PidFile {folder / 'sshd.pid'}",
                f"AuthorizedKeysFile {authorized}",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PubkeyAuthentication yes",
                "PermitRootLogin prohibit-password",
                f"AllowUsers {host.user}",
                "StrictModes no",  # the run's folders live under /tmp
                "UsePAM no",
                "LogLevel INFO",
                "",
            ]
        )
    )
    os.chmod(host.config, 0o600)
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation


def _write_known_hosts(host: SshHost) -> None:
    scan = subprocess.run(
        ["ssh-keyscan", "-p", str(host.port), "-t", "ed25519", host.ip],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    if not scan.stdout.strip():
        raise RuntimeError(f"ssh-keyscan found no host key: {scan.stderr}")
    known = host.home / ".ssh" / "known_hosts"
    known.write_text(scan.stdout)
    os.chmod(known, 0o600)


@contextlib.contextmanager
def ssh_host(folder: Path) -> Iterator[SshHost]:
    """sshd on 127.0.0.2 with a host key and a user key made for the run; stopped after,
    with every process it started (the kernels' launchers included)."""
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    host = SshHost(
        folder=folder,
        ip=HOST_IP,
        port=_free_port(HOST_IP),
        user=getpass.getuser(),
        home=folder / "home",
        python=make_remote_python(folder),
    )
    _write_config(host)
    host.start()
    try:
        _write_known_hosts(host)
        yield host
    finally:
        host.stop()
        kill_remote_kernels(host.python)


def kill_remote_kernels(python: Path) -> None:
    """Kill what kernels over SSH left running: their processes are not this process's
    children (sshd started them), so they are found by their launcher's command line."""
    import psutil

    victims = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "--response-address" in cmdline and str(python) in cmdline:
            victims.append(proc)
    for proc in victims:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGKILL)
    psutil.wait_procs(victims, timeout=10)


@pytest.fixture(scope="session")
def ssh_host_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshHost]:
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    with ssh_host(tmp_path_factory.mktemp("ssh")) as host:
        yield host


@pytest.fixture
def ssh_kernel(ssh_host_session: SshHost) -> Iterator[tuple[SshHost, str]]:
    """(host, kernelspec name) with this process set up as the notebook machine."""
    with ssh_host_session.client_env():
        name = ssh_host_session.write_kernelspec(os.environ["DSPEX_HOME"])
        yield ssh_host_session, name


def kernelspec_path(dspex_home: str | Path, name: str) -> Path:
    """The kernel.json of kernelspec ``name`` under ``dspex_home``."""
    return Path(dspex_home) / "share" / "jupyter" / "kernels" / name / "kernel.json"
