"""The kernelspecs ``dspex kernelspec ssh|k8s|docker`` writes, and what gateway_provisioners
launches from them.

No Kubernetes cluster and no Docker daemon is used: none can run here. The pod manifest is
the one gateway_provisioners' own launcher renders in its dry-run mode (``--pod-template``),
with a kubeconfig naming a cluster that is never contacted; the container config is the
request docker's own client library sends, recorded by a stub Docker Engine API on a unix
socket. Everything before that (kernelspec lookup, provisioner, its ``pre_launch`` with the
argv substitutions and the kernel's environment) is jupyter_client's and gateway_provisioners'
real code, run in a subprocess so that gateway_provisioners' process-wide response listener
never outlives the test.
"""

from __future__ import annotations

import getpass
import http.server
import json
import os
import socket
import socketserver
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from jupyter_client.provisioning import KernelProvisionerBase
from jupyter_client.provisioning.factory import KernelProvisionerFactory

from dspex_jupyter import cli
from dspex_jupyter.core import envs, kernelspecs
from dspex_jupyter.core.errors import EnvironmentNotFound, KernelspecError

IMAGE = "registry.example.com/team/dspex-kernel:1.0"
REMOTE_PYTHON = "/opt/envs/mipro/bin/python"
PLACEHOLDERS = ["{kernel_id}", "{port_range}", "{response_address}", "{public_key}",
                "{transport_encryption}"]  # fmt: skip

# Run in a subprocess: jupyter_client's kernel manager prepares each kernel's launch exactly as
# a pool's start would (provisioner from the kernelspec, its pre_launch, argv placeholders
# substituted), and prints the command, environment and ids instead of launching.
PRE_LAUNCH = """
import asyncio, json, sys
from jupyter_client import AsyncKernelManager
from dspex_jupyter.core.envs import kernel_spec_manager

async def main(home, names):
    out = {}
    for name in names:
        km = AsyncKernelManager(kernel_name=name, kernel_spec_manager=kernel_spec_manager(home))
        cmd, kw = await km.pre_start_kernel(transport_encryption="required")
        out[name] = {"cmd": cmd, "env": dict(kw["env"]), "kernel_id": km.kernel_id,
                     "response_address": km.provisioner.response_address}
        await km.provisioner.cleanup()
    from gateway_provisioners.response_manager import ResponseManager
    ResponseManager.instance().stop_response_manager()
    print(json.dumps(out))

asyncio.run(main(sys.argv[1], sys.argv[2:]))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pre_launch(home: Path, names: list[str], env: dict[str, str]) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-c", PRE_LAUNCH, str(home), *names],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


class _StubDockerEngine(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """Answers the Docker Engine API calls of ``containers.run(detach=True)`` and records
    each request: the container config docker's client sends, no container started."""

    daemon_threads = True

    def __init__(self, path: str) -> None:
        self.requests: list[dict[str, Any]] = []
        super().__init__(path, _EngineHandler)


class _EngineHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _StubDockerEngine

    def log_message(self, *args: Any) -> None:  # a unix socket has no client address
        pass

    def _answer(self, status: int, body: Any = None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self.server.requests.append({"method": "GET", "path": self.path})
        if self.path.endswith("/version"):
            self._answer(200, {"ApiVersion": "1.45", "Version": "stub", "MinAPIVersion": "1.24"})
        elif "/containers/" in self.path and self.path.endswith("/json"):
            self._answer(200, {"Id": "stub0", "Name": "/stub", "State": {"Status": "created"}})
        else:
            self._answer(404, {"message": f"stub engine: no {self.path}"})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"null")
        self.server.requests.append({"method": "POST", "path": self.path, "body": body})
        if "/containers/create" in self.path:
            self._answer(201, {"Id": "stub0", "Warnings": []})
        elif self.path.endswith("/start"):
            self._answer(204)
        else:
            self._answer(404, {"message": f"stub engine: no {self.path}"})


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """One kernelspec of each kind in a private home."""
    home = tmp_path_factory.mktemp("remote-home")
    specs = {
        "ssh": kernelspecs.write_ssh_kernelspec(
            "ssh_mipro",
            hosts="127.0.0.2,gpu2",
            remote_python=REMOTE_PYTHON,
            user="alice",
            port=2222,
            allow_root=True,
            home=home,
        ),
        "k8s": kernelspecs.write_k8s_kernelspec(
            "k8s_mipro", image=IMAGE, namespace="ml-team", allow_root=True, home=home
        ),
        "docker": kernelspecs.write_docker_kernelspec(
            "docker_mipro", image=IMAGE, allow_root=True, home=home
        ),
    }
    return home, specs


@pytest.fixture(scope="module")
def launched(written, tmp_path_factory):
    """What gateway_provisioners prepares to launch for each spec; the docker provisioner
    talks to a stub engine, the k8s one reads a kubeconfig whose cluster is never reached."""
    home, specs = written
    folder = tmp_path_factory.mktemp("engine")
    engine = _StubDockerEngine(str(folder / "docker.sock"))
    thread = threading.Thread(target=engine.serve_forever, daemon=True)
    thread.start()
    kubeconfig = folder / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "never", "cluster": {"server": "https://127.0.0.1:9"}}],
                "users": [{"name": "nobody", "user": {}}],
                "contexts": [{"name": "c", "context": {"cluster": "never", "user": "nobody"}}],
                "current-context": "c",
            }
        )
    )
    env = {
        **os.environ,
        "GP_RESPONSE_IP": "127.0.0.1",
        "GP_RESPONSE_PORT": str(_free_port()),
        "DOCKER_HOST": f"unix://{folder / 'docker.sock'}",
        "KUBECONFIG": str(kubeconfig),
        "GP_USE_INCLUSTER_CONFIG": "false",  # outside a cluster: read KUBECONFIG
    }
    try:
        prepared = _pre_launch(home, [s.name for s in specs.values()], env)
        yield {kind: prepared[spec.name] for kind, spec in specs.items()}, env, engine
    finally:
        engine.shutdown()
        engine.server_close()


def test_each_spec_loads_with_its_provisioner_entry_point(written):
    home, specs = written
    manager = envs.kernel_spec_manager(home)
    factory = KernelProvisionerFactory.instance()
    for kind, written_spec in specs.items():
        spec = manager.get_kernel_spec(written_spec.name)
        provisioner = kernelspecs.PROVISIONERS[kind]
        assert spec.metadata["kernel_provisioner"]["provisioner_name"] == provisioner
        assert factory.is_provisioner_available(spec), kind
        assert issubclass(factory.provisioners[provisioner].load(), KernelProvisionerBase)
        # gateway_provisioners' launcher and placeholders, asking for the dspex kernel class
        if kind == "ssh":  # its launch_ipykernel.py, from the host's install, bound to one IP
            assert spec.argv[1:3] == ["-m", kernelspecs.SSH_LAUNCHER]
        else:  # the launcher that asks the cluster for a pod or container runs here
            launcher = Path(spec.argv[1])
            assert launcher.is_file() and launcher.parent.parent == written_spec.path
        assert [a for a in spec.argv if a.startswith("{")] == PLACEHOLDERS
        assert spec.argv[spec.argv.index("--kernel-class-name") + 1] == kernelspecs.KERNEL_CLASS
        # CurveZMQ: the spec supports it, and dspex asks for it unless told otherwise
        assert spec.metadata["supported_encryption"] == ["curve"]
        assert spec.metadata["dspex"]["transport_encryption"] == "required"
        assert spec.metadata["dspex"]["remote"] == kind
        assert spec.metadata["kernel_provisioner"]["config"]["unauthorized_users"] == []
        # private: a 0700 folder, 0600 files
        for path in [written_spec.path, *written_spec.path.rglob("*")]:
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode == (0o700 if path.is_dir() else 0o600), path
    ssh = manager.get_kernel_spec("ssh_mipro")
    assert ssh.argv[0] == REMOTE_PYTHON  # runs on the host
    assert ssh.metadata["kernel_provisioner"]["config"]["remote_hosts"] == ["127.0.0.2", "gpu2"]
    assert (
        ssh.metadata["dspex"]["ssh_user"] == "alice" and ssh.metadata["dspex"]["ssh_port"] == 2222
    )
    assert ssh.metadata["dspex"]["response_ip"] == "127.0.0.1"
    k8s = manager.get_kernel_spec("k8s_mipro")
    assert k8s.argv[0] == sys.executable  # the pod's launcher runs here
    assert k8s.metadata["kernel_provisioner"]["config"]["image_name"] == IMAGE
    assert k8s.env == {"KERNEL_NAMESPACE": "ml-team"}
    assert [s.name for s in kernelspecs.remote_kernelspecs(home)] == [
        "docker_mipro",
        "k8s_mipro",
        "ssh_mipro",
    ]


def test_ssh_launch_command_runs_the_dspex_kernel_on_the_host(launched):
    prepared, env, _ = launched
    ssh = prepared["ssh"]
    cmd = ssh["cmd"]
    assert cmd[:3] == [REMOTE_PYTHON, "-m", kernelspecs.SSH_LAUNCHER]
    assert not [a for a in cmd if a.startswith("{")]  # every placeholder substituted
    assert cmd[cmd.index("--kernel-id") + 1] == ssh["kernel_id"]
    assert cmd[cmd.index("--response-address") + 1] == f"127.0.0.1:{env['GP_RESPONSE_PORT']}"
    assert cmd[cmd.index("--transport-encryption") + 1] == "required"
    assert cmd[cmd.index("--kernel-class-name") + 1] == kernelspecs.KERNEL_CLASS


def test_k8s_pod_manifest_names_image_kernel_response_address_and_dspex_runtime(launched, tmp_path):
    prepared, env, _ = launched
    k8s = prepared["k8s"]
    manifest = tmp_path / "pod.yaml"
    # gateway_provisioners' own launcher, in its dry-run mode: it renders kernel-pod.yaml.j2
    # with the kernel's environment and writes the pod instead of creating it.
    result = subprocess.run(
        [*k8s["cmd"], "--pod-template", str(manifest)],
        env={**k8s["env"], "KUBECONFIG": env["KUBECONFIG"]},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    pod = yaml.safe_load(manifest.read_text())
    assert pod["kind"] == "Pod"
    assert pod["metadata"]["namespace"] == "ml-team"
    assert pod["metadata"]["labels"]["kernel_id"] == k8s["kernel_id"]
    assert k8s["kernel_id"] in pod["metadata"]["name"]
    (container,) = pod["spec"]["containers"]
    assert container["image"] == IMAGE
    pod_env = {item["name"]: item["value"] for item in container["env"]}
    assert pod_env["KERNEL_ID"] == k8s["kernel_id"]
    assert pod_env["RESPONSE_ADDRESS"] == k8s["response_address"]
    assert pod_env["RESPONSE_ADDRESS"] == f"127.0.0.1:{env['GP_RESPONSE_PORT']}"
    assert pod_env["PUBLIC_KEY"]  # the connection info comes back encrypted to this key
    # the image's bootstrap-kernel.sh starts the Python launcher with the dspex kernel class
    assert pod_env["KERNEL_LANGUAGE"] == "python"
    assert pod_env["KERNEL_CLASS_NAME"] == kernelspecs.KERNEL_CLASS
    assert pod_env["TRANSPORT_ENCRYPTION"] == "required"


def test_docker_container_config_names_image_kernel_and_dspex_runtime(launched):
    prepared, env, engine = launched
    docker = prepared["docker"]
    result = subprocess.run(
        docker["cmd"],
        env={**docker["env"], "DOCKER_HOST": env["DOCKER_HOST"]},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    (create,) = [r for r in engine.requests if "/containers/create" in r["path"]]
    assert f"name={getpass.getuser()}-{docker['kernel_id']}" in create["path"]
    config = create["body"]
    assert config["Image"] == IMAGE
    assert config["Labels"]["kernel_id"] == docker["kernel_id"]
    container_env = dict(item.split("=", 1) for item in config["Env"])
    assert container_env["KERNEL_ID"] == docker["kernel_id"]
    assert container_env["RESPONSE_ADDRESS"] == docker["response_address"]
    assert container_env["KERNEL_CLASS_NAME"] == kernelspecs.KERNEL_CLASS
    assert container_env["TRANSPORT_ENCRYPTION"] == "required"
    assert config["HostConfig"]["NetworkMode"] == "bridge"
    assert any(r["path"].endswith("/start") for r in engine.requests)  # then started


@pytest.mark.parametrize(
    ("kind", "options", "error", "message"),
    [
        ("ssh", {"hosts": [], "remote_python": REMOTE_PYTHON}, KernelspecError, "one host"),
        ("ssh", {"hosts": "gpu1;rm -rf", "remote_python": REMOTE_PYTHON}, KernelspecError,
         "invalid host"),
        ("ssh", {"hosts": "gpu1"}, KernelspecError, "needs the Python"),
        ("ssh", {"hosts": "gpu1", "env": "nope"}, EnvironmentNotFound, "no dspex environment"),
        ("ssh", {"hosts": "gpu1", "remote_python": "bin/python"}, KernelspecError, "absolute"),
        ("ssh", {"hosts": "gpu1", "remote_python": REMOTE_PYTHON, "port": 70000},
         KernelspecError, "invalid SSH port"),
        ("ssh", {"hosts": "gpu1", "remote_python": REMOTE_PYTHON, "response_ip": "here"},
         KernelspecError, "not an IP address"),
        ("ssh", {"hosts": "gpu1", "remote_python": REMOTE_PYTHON,
                 "transport_encryption": "maybe"}, KernelspecError, "transport encryption"),
        ("k8s", {"image": "Not An Image"}, KernelspecError, "invalid image"),
        ("k8s", {"image": ""}, KernelspecError, "needs an image"),
        ("k8s", {"image": IMAGE, "namespace": "Bad_NS"}, KernelspecError, "namespace"),
        ("docker", {"image": IMAGE, "launch_timeout": -1}, KernelspecError, "launch timeout"),
        ("yarn", {}, KernelspecError, "unknown kind"),
    ],
)  # fmt: skip
def test_bad_input_is_a_typed_error_with_a_hint(tmp_path, kind, options, error, message):
    with pytest.raises(error, match=message) as caught:
        kernelspecs.write_kernelspec(kind, "remote_x", home=tmp_path, **options)
    assert caught.value.hint
    folder = envs.kernels_dir(tmp_path)
    assert not folder.exists() or not list(folder.iterdir())  # nothing half-written left


def test_names_and_replacing(tmp_path):
    with pytest.raises(KernelspecError, match="invalid kernelspec name") as caught:
        kernelspecs.write_docker_kernelspec("Bad Name", image=IMAGE, home=tmp_path)
    assert "lowercase" in caught.value.hint
    first = kernelspecs.write_docker_kernelspec("dk", image=IMAGE, home=tmp_path)
    with pytest.raises(KernelspecError, match="already exists") as caught:
        kernelspecs.write_docker_kernelspec("dk", image="other:2", home=tmp_path)
    assert "--replace" in caught.value.hint
    assert (
        json.loads((first.path / "kernel.json").read_text())["metadata"]["dspex"]["image"] == IMAGE
    )
    kernelspecs.write_docker_kernelspec("dk", image="other:2", home=tmp_path, replace=True)
    assert json.loads((first.path / "kernel.json").read_text())["metadata"]["dspex"]["image"] == (
        "other:2"
    )
    kernelspecs.remove_kernelspec("dk", home=tmp_path)
    assert not first.path.exists()
    with pytest.raises(KernelspecError, match="no remote kernelspec"):
        kernelspecs.remove_kernelspec("dk", home=tmp_path)


def test_cli_writes_lists_and_refuses_bad_input(tmp_path, capsys):
    home = ["--home", str(tmp_path)]
    assert cli.main([*home, "kernelspec", "ssh", "ssh_a", "--remote-python", REMOTE_PYTHON,
                     "--hosts", "gpu1,gpu2", "--port", "2222"]) == 0  # fmt: skip
    assert 'PoolSpec("ssh_a", kernel="ssh_a")' in capsys.readouterr().out
    assert cli.main([*home, "kernelspec", "k8s", "k8s_a", "--image", IMAGE]) == 0
    capsys.readouterr()
    assert cli.main([*home, "kernelspec", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["kind"]) for r in rows] == [("k8s_a", "k8s"), ("ssh_a", "ssh")]
    assert rows[1]["hosts"] == ["gpu1", "gpu2"] and rows[1]["ssh_port"] == 2222
    assert cli.main([*home, "kernelspec", "docker", "dk", "--image", "BAD IMAGE"]) == 2
    assert "invalid image reference" in capsys.readouterr().err
    # env create --remote checks its remote options before building anything
    assert cli.main([*home, "env", "create", "mipro", "--remote", "ssh"]) == 2
    err = capsys.readouterr().err
    assert "at least one host" in err and "hint:" in err
    assert not (envs.envs_dir(tmp_path) / "mipro").exists()


@pytest.mark.integration
def test_the_dspex_kernel_class_answers_dspex_ops_from_its_first_message(tmp_path):
    """What --kernel-class-name starts (here by ipykernel's own launcher, no provisioner):
    a kernel that answers the dspex comm with no bootstrap code run in it."""
    import uuid

    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpecManager

    from dspex_jupyter import protocol

    spec_dir = tmp_path / "dspex_class"
    spec_dir.mkdir()
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}",
            f"--IPKernelApp.kernel_class={kernelspecs.KERNEL_CLASS}"]  # fmt: skip
    (spec_dir / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "dspex class", "language": "python"})
    )
    km = KernelManager(
        kernel_name="dspex_class", kernel_spec_manager=KernelSpecManager(kernel_dirs=[tmp_path])
    )
    km.start_kernel()
    kc = km.client()
    try:
        kc.start_channels()
        kc.wait_for_ready(timeout=60)
        comm_id = uuid.uuid4().hex
        request = protocol.make_request("hello")
        for msg_type, content in [
            ("comm_open", {"comm_id": comm_id, "target_name": protocol.COMM_TARGET, "data": {}}),
            ("comm_msg", {"comm_id": comm_id, "data": request}),
        ]:
            kc.shell_channel.send(kc.session.msg(msg_type, content))
        while True:
            msg = kc.get_iopub_msg(timeout=30)
            data = msg["content"].get("data") or {}
            if msg["msg_type"] == "comm_msg" and data.get("id") == request["id"]:
                break
        assert data["ok"] is True
        assert data["result"]["pid"] == km.provisioner.process.pid
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_a_hosts_python_here_that_cannot_run_the_launcher_is_refused(tmp_path):
    bare = getattr(sys, "_base_executable", "")  # this Python's base: no packages of ours
    probe = subprocess.run([bare, "-c", "import gateway_provisioners"], capture_output=True)
    if not bare or probe.returncode == 0:
        pytest.skip("no Python without gateway_provisioners here")
    with pytest.raises(KernelspecError, match="cannot run the SSH kernel launcher") as caught:
        kernelspecs.write_ssh_kernelspec("ssh_bare", hosts="gpu1", remote_python=bare,
                                         home=tmp_path)  # fmt: skip
    assert "gateway-provisioners==0.5.0" in caught.value.hint
    # this environment's Python has all it needs
    spec = kernelspecs.write_ssh_kernelspec("ssh_ok", hosts="gpu1", remote_python=sys.executable,
                                            home=tmp_path)  # fmt: skip
    assert spec.spec["argv"][0] == sys.executable
