"""A pool of kernels on an SSH host, launched by gateway_provisioners' distributed-provisioner.

Real sshd on 127.0.0.2 (remote_fixtures.py), real SSH logins, real kernels in another virtual
environment, CurveZMQ on every channel. Nothing is mocked: the "host" is this machine, which
is what lets the test look at the kernels' sockets and kill them.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import cloudpickle
import psutil
import pyarrow as pa
import pytest
import zmq
from jupyter_client.session import Session as JupyterSession

from dspex_jupyter import MIPROv2, PoolManager, PoolSpec
from dspex_jupyter.core.errors import (
    CallTimeout,
    KernelDied,
    SessionKernelLost,
    TransportNotEncrypted,
)
from dspex_jupyter.exchange import CHUNK_BYTES
from tests.integration import mipro_helpers as mh
from tests.integration import remote_fixtures
from tests.integration.remote_fixtures import ssh_host_session, ssh_kernel  # noqa: F401
from tests.integration.test_mipro import in_process_reference, start, trials_of

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

# The remote kernels cannot import this test module: its functions travel by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def square(x):
    return x * x


def remember(value):
    from dspex_jupyter.runtime import session_state

    seen = session_state().setdefault("seen", [])
    seen.append(value)
    return list(seen)


def countdown(n):
    yield from range(n, 0, -1)


def spin(seconds):
    end = time.time() + seconds
    while time.time() < end:  # pure Python: an interrupt stops it
        pass


def same_table(table):
    return table


def table_of(megabytes):
    import numpy as np
    import pyarrow as pa

    rows = megabytes * 1024 * 1024 // 16
    return pa.table({"a": np.arange(rows, dtype="int64"), "b": np.ones(rows, dtype="float64")})


def listening_addresses(pid):
    """The addresses the process tree of ``pid`` (on this machine) listens on."""
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    found = []
    for proc in procs:
        for conn in proc.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN:
                found.append((conn.laddr.ip, conn.laddr.port))
    return found


@pytest.fixture(scope="module")
def reference():
    task = mh.task()
    return in_process_reference(task, task.lm())


@pytest.fixture
def remote(ssh_kernel):  # noqa: F811
    host, name = ssh_kernel
    spec = PoolSpec("gpu", kernel=name, size=2, env_vars={"DSPEX_TEST_KEY": SECRET})
    with PoolManager([spec]) as manager:
        yield host, manager["gpu"]


SECRET = "sk-remote-canary-0123456789"


def environ_and_cmdline(name):
    """The kernel's own view of a variable, and whether it shows in its host's process list."""
    cmdlines = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdlines.append(" ".join(proc.info["cmdline"] or []))
    return os.environ.get(name), any(SECRET in line for line in cmdlines)


def test_a_pool_over_ssh_is_encrypted_and_serves_everything(remote):
    _, pool = remote
    source = pool.source
    argv = source.kernel_spec_manager.get_kernel_spec(source.kernel_name).argv
    assert argv[1:3] == ["-m", "dspex_jupyter.runtime.remote_launcher"]  # binds one address
    workers = pool.workers
    assert len(workers) == 2 and not any(w.is_local for w in workers)
    assert pool.kernel_pids == []  # no local process: the provisioner is asked
    for worker in workers:
        info = worker.kernel.connection_info
        assert info["transport"] == "tcp" and info["ip"] == remote_fixtures.HOST_IP
        assert info["curve_publickey"] and info["curve_secretkey"]  # CurveZMQ on
        assert info["signature_scheme"] == "hmac-sha256" and info["key"]
        assert worker.exchange.folder is None and not worker.exchange.shared_memory

    # The pool's env_vars (API keys) reach every kernel over the encrypted channel, never
    # on a command line of the host.
    for _ in workers:
        assert pool.call(environ_and_cmdline, "DSPEX_TEST_KEY") == (SECRET, False)

    # Calls, a map, a session with state, a stream, execute.
    assert pool.call(square, 7) == 49
    assert pool.map(square, range(10)) == [x * x for x in range(10)]
    with pool.session(state={"seen": [0]}) as session:
        assert session.call(remember, 1) == [0, 1]
        assert session.call(remember, 2) == [0, 1, 2]
        assert list(session.stream(countdown, 5)) == [5, 4, 3, 2, 1]
        out = session.execute("import socket; print(socket.gethostname())", show=False)
        assert out.stdout.strip() == os.uname().nodename
        remote_pids = {session.call(os.getpid)}
    # An interrupt goes through the provisioner (a signal by its listener on the host): the
    # call stops, the kernel and its state stay.
    with pool.session(state={"seen": [7]}, call_timeout=3) as session:
        pid = session.call(os.getpid)
        with pytest.raises(CallTimeout):
            session.call(spin, 120)
        assert session.call(os.getpid) == pid and session.call(remember, 8) == [7, 8]
    remote_pids |= set(pool.map(lambda _: os.getpid(), range(8), chunksize=1))

    # A 100 MB table both ways, in message pieces of at most CHUNK_BYTES (8 MiB).
    sent = []
    for worker in workers:
        send = worker._send_comm  # the worker's only way out to its kernel

        def spy(data, buffers, send=send):
            sent.append(sum(memoryview(b).nbytes for b in buffers or []))
            send(data, buffers)

        worker._send_comm = spy
    table = table_of(100)
    assert table.nbytes >= 100 * 1024 * 1024
    back = pool.call(same_table, table)
    assert isinstance(back, pa.Table) and back.equals(table)
    assert max(sent) <= CHUNK_BYTES and sum(sent) >= table.nbytes  # went, in pieces
    received = []
    for worker in workers:
        take_piece = worker._pieces.piece  # where the worker's pieces arrive

        def spy_in(data, buffers, take_piece=take_piece):
            received.append(sum(memoryview(b).nbytes for b in buffers))
            take_piece(data, buffers)

        worker._pieces.piece = spy_in
    made = pool.call(table_of, 100)  # made there, comes back in pieces too
    assert made.equals(table)
    assert max(received) <= CHUNK_BYTES and sum(received) >= table.nbytes

    # Nothing of the kernels listens beyond loopback (here: the SSH host's 127.0.0.2).
    for pid in remote_pids:
        addresses = listening_addresses(pid)
        assert addresses and all(ip.startswith("127.") for ip, _ in addresses), addresses
    # Nor does this process: gateway_provisioners' response listener is on 127.0.0.1.
    here = listening_addresses(os.getpid())
    assert (remote_fixtures.RESPONSE_IP, _response_port()) in here
    assert all(ip.startswith("127.") for ip, _ in here), here


def test_a_plain_client_is_refused(remote):
    """Signed messages without Curve keys get no answer; with them, an answer."""
    _, pool = remote
    info = pool.workers[0].kernel.connection_info
    key, public, secret = (_bytes(info[k]) for k in ("key", "curve_publickey", "curve_secretkey"))
    session = JupyterSession(key=key, signature_scheme=info["signature_scheme"])
    url = f"tcp://{info['ip']}:{info['shell_port']}"

    def ask(curve):
        context = zmq.Context()
        sock = context.socket(zmq.DEALER)
        sock.linger = 0
        if curve:
            sock.curve_secretkey, sock.curve_publickey, sock.curve_serverkey = (
                secret,
                public,
                public,
            )
        sock.connect(url)
        session.send(sock, "kernel_info_request", {})
        answered = sock.poll(5000)
        sock.close()
        context.term()
        return bool(answered)

    assert not ask(curve=False)
    assert ask(curve=True)  # the same request, encrypted: answered


def test_a_dead_or_stopped_kernel_over_ssh_is_seen_within_5s_and_replaced(remote):
    host, pool = remote
    session = pool.session(call_timeout=30)
    pid = session.call(os.getpid)
    killed = host.ssh(f"kill -9 {pid}")
    assert killed.returncode == 0, killed.stderr
    started = time.monotonic()
    with pytest.raises(KernelDied):
        session.call(square, 2)
    assert time.monotonic() - started < 5.0
    assert pool.wait_ready(timeout=90)
    assert pool.health()["deaths"] == 1
    assert pid not in set(pool.map(lambda _: os.getpid(), range(4), chunksize=1))

    # A kernel that stops answering while its process exists (SIGSTOP: the provisioner's
    # poll still finds it) is seen by its missed heartbeats, also within 5 s.
    session = pool.session(call_timeout=30)
    pid = session.call(os.getpid)
    assert host.ssh(f"kill -STOP {pid}").returncode == 0
    started = time.monotonic()
    with pytest.raises(KernelDied):
        session.call(square, 2)
    assert time.monotonic() - started < 5.0
    assert pool.wait_ready(timeout=90) and pool.health()["deaths"] == 2
    host.ssh(f"kill -9 {pid}")  # the provisioner's own kill may still be on its way


def test_optimization_over_ssh_survives_sshd_stopping(remote, reference, tmp_path):
    """A MIPROv2 run with checkpoints; mid-run its kernel is SIGKILLed over SSH and sshd
    stops: the run fails with a classified error, the replacement cannot be launched
    (classified too), and once sshd is back the run resumes exactly."""
    host, pool = remote
    task = mh.task()
    lm = task.lm(latency_s=0.05)  # the run lasts long enough to be killed in
    folder = tmp_path / "run"  # both "hosts" see this disk (checkpoint mirroring: K's)
    # The pool's two kernels, as their host sees them: the run takes one of them.
    victims = set(pool.map(lambda _: os.getpid(), range(6), chunksize=1))
    run = start(pool, task, lm, folder, recovery={"auto_resume": 0})
    reached = threading.Event()
    run.on_event(lambda e: e["kind"] == "trial" and e["number"] == 2 and reached.set())
    assert reached.wait(180)
    killed = host.ssh(f"kill -9 {' '.join(map(str, victims))}")
    assert killed.returncode == 0, killed.stderr
    host.stop()  # sshd gone: no new kernel can be launched
    with pytest.raises(SessionKernelLost):
        run.result(timeout=60)
    # Its replacement cannot be launched: the pool says why, in the words of the error.
    failure = _wait_for(lambda: "could not be launched" in pool.health()["last_error"], 90)
    assert failure, pool.health()["last_error"]
    assert (
        "Connection refused" in pool.health()["last_error"] or "SSH" in pool.health()["last_error"]
    )
    host.start()
    assert pool.wait_ready(timeout=120)
    resumed = MIPROv2.resume(folder, pool, program=task.make_program(),
                             metric=task.metric, task_lm=lm, prompt_lm=lm)  # fmt: skip
    result = resumed.result(timeout=180)
    expected_trials, expected_state = reference
    assert trials_of(result) == expected_trials
    assert result.state == expected_state
    assert any(e["kind"] == "resumed" for e in resumed.events)


def test_unencrypted_remote_pool_is_refused_unless_named(ssh_kernel):  # noqa: F811
    _, name = ssh_kernel
    path = remote_fixtures.kernelspec_path(os.environ["DSPEX_HOME"], name)
    spec = json.loads(path.read_text())
    del spec["metadata"]["supported_encryption"]
    path.write_text(json.dumps(spec))
    with pytest.raises(TransportNotEncrypted, match="allow_unencrypted='plain'"):
        PoolManager([PoolSpec("plain", kernel=name, size=1)]).start()
    with pytest.raises(Exception, match="allow_unencrypted must be the pool's own name"):
        PoolSpec("plain", kernel=name, allow_unencrypted="other")


def _response_port():
    from gateway_provisioners.response_manager import ResponseManager

    return int(ResponseManager.instance().response_address.rsplit(":", 1)[1])


def _bytes(value):
    return value if isinstance(value, bytes) else value.encode()


def _wait_for(condition, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)  # polling a pool's health: there is no event for "launch failed"
    return False
