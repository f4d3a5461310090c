"""In a real ipykernel: widget updates made on a background thread reach the frontend, and
the ``dspex.lab`` comm answers as its protocol says, also while a cell holds the main shell
(the comm the kernel opens, actions over a subshell). The test plays the frontend."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from jupyter_client import KernelManager

pytestmark = pytest.mark.integration

WAIT = 30.0


@pytest.fixture(scope="module")
def kernel():
    manager = KernelManager(kernel_name="python3")
    manager.start_kernel()
    client = manager.blocking_client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=WAIT)
        yield client
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


def iopub_until(client: Any, predicate, timeout: float = WAIT) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            msg = client.get_iopub_msg(timeout=max(0.01, deadline - time.monotonic()))
        except Exception:  # queue.Empty
            break
        if predicate(msg):
            return msg
    raise AssertionError("the kernel did not send the expected message")


def run_cell(client: Any, code: str) -> None:
    reply = client.execute_interactive(code, timeout=WAIT, output_hook=lambda msg: None)
    assert reply["content"]["status"] == "ok", reply["content"]


def test_widget_updates_from_a_thread_reach_the_frontend(kernel):
    run_cell(kernel, "%load_ext dspex_jupyter\n%load_ext dspex_jupyter")
    code = (
        "import threading, ipywidgets\n"
        "label = ipywidgets.HTML('start')\n"
        "def bump():\n"
        "    for i in range(3):\n"
        "        label.value = f'from thread {i}'\n"
        "threading.Thread(target=bump).start()\n"
    )
    kernel.execute(code)
    update = iopub_until(
        kernel,
        lambda m: (
            m["msg_type"] == "comm_msg"
            and m["content"]["data"].get("method") == "update"
            and m["content"]["data"].get("state", {}).get("value") == "from thread 2"
        ),
    )
    assert update["content"]["comm_id"]


def test_lab_comm_sends_state_and_answers_actions(kernel):
    comm_id = uuid.uuid4().hex
    open_msg = kernel.session.msg(
        "comm_open", {"comm_id": comm_id, "target_name": "dspex.lab", "data": {}}
    )
    kernel.shell_channel.send(open_msg)

    def from_bridge(kind: str):
        return lambda m: (
            m["msg_type"] == "comm_msg"
            and m["content"]["comm_id"] == comm_id
            and m["content"]["data"].get("type") == kind
        )

    state = iopub_until(kernel, from_bridge("state"))["content"]["data"]["state"]
    assert set(state) == {"time", "pools", "runs", "gpu", "sessions_active", "cwd"}
    assert state["pools"] == [] and state["sessions_active"] == 0

    def action(request_id: int, name: str, target: dict[str, Any]) -> dict[str, Any]:
        data = {"type": "action", "id": request_id, "action": name, "target": target}
        kernel.shell_channel.send(
            kernel.session.msg("comm_msg", {"comm_id": comm_id, "data": data})
        )
        reply = iopub_until(
            kernel,
            lambda m: from_bridge("action_result")(m) and m["content"]["data"]["id"] == request_id,
        )
        return reply["content"]["data"]

    assert action(1, "format_disk", {}) == {
        "type": "action_result",
        "id": 1,
        "ok": False,
        "message": "unknown action 'format_disk'",
    }
    reply = action(2, "restart_kernel", {"pool": "none", "kernel": "none/1"})
    assert reply["ok"] is False and "no running pool named 'none'" in reply["message"]
    # The state keeps coming (every 2 s at the latest) while the comm is open.
    iopub_until(kernel, from_bridge("state"), timeout=5)
    kernel.shell_channel.send(kernel.session.msg("comm_close", {"comm_id": comm_id, "data": {}}))


# Blocks the kernel's main thread until the bridge has pushed two more states (or 20 s).
BLOCK_UNTIL_TWO_STATES = """\
from dspex_jupyter.notebook.magics import _LOADED
bridge = _LOADED[get_ipython()]["bridge"]
start = bridge.states_sent
bridge.wait_until(lambda: bridge.states_sent >= start + 2, timeout=20)
"""


def test_the_kernel_opens_its_own_comm_and_pushes_states_while_a_cell_runs(kernel):
    run_cell(kernel, "%unload_ext dspex_jupyter")
    seen: list[dict[str, Any]] = []
    reply = kernel.execute_interactive(
        "%load_ext dspex_jupyter", timeout=WAIT, output_hook=seen.append
    )
    assert reply["content"]["status"] == "ok", reply["content"]
    (opened,) = [
        m
        for m in seen
        if m["msg_type"] == "comm_open" and m["content"]["target_name"] == "dspex.lab"
    ]
    assert opened["content"]["data"] == {"type": "hello", "version": 1}
    comm_id = opened["content"]["comm_id"]

    # While a cell holds the main thread, states keep coming on that comm: no frontend
    # request has to wait for the shell.
    msg_id = kernel.execute(BLOCK_UNTIL_TWO_STATES)
    states_while_busy = 0
    while True:
        msg = iopub_until(kernel, lambda m: True)
        if (
            msg["msg_type"] == "comm_msg"
            and msg["content"]["comm_id"] == comm_id
            and msg["content"]["data"].get("type") == "state"
        ):
            states_while_busy += 1
        if (
            msg["msg_type"] == "status"
            and msg["parent_header"].get("msg_id") == msg_id
            and msg["content"]["execution_state"] == "idle"
        ):
            break
    assert states_while_busy >= 2
    reply = kernel.get_shell_msg(timeout=WAIT)
    assert reply["parent_header"]["msg_id"] == msg_id and reply["content"]["status"] == "ok"


def on_subshell(msg: dict[str, Any], subshell_id: str) -> dict[str, Any]:
    """``msg`` sent to a kernel subshell (JEP 91) instead of the main shell."""
    msg["header"]["subshell_id"] = subshell_id
    return msg


def test_an_action_is_answered_on_a_subshell_while_a_cell_runs(kernel):
    """What JupyterLab does (its comm messages go over a subshell of their own): the answer
    comes while the main shell is still busy, on the comm the kernel opened."""
    run_cell(kernel, "%unload_ext dspex_jupyter")
    seen: list[dict[str, Any]] = []
    kernel.execute_interactive("%load_ext dspex_jupyter", timeout=WAIT, output_hook=seen.append)
    (comm_id,) = [m["content"]["comm_id"] for m in seen if m["msg_type"] == "comm_open"]
    kernel.control_channel.send(kernel.session.msg("create_subshell_request", {}))
    subshell_id = kernel.get_control_msg(timeout=WAIT)["content"]["subshell_id"]

    # The main shell waits for an event that only a request on the subshell sets.
    busy = kernel.execute("import threading\nrelease = threading.Event()\nrelease.wait(60)")
    target = {"pool": "none", "session": "s"}
    data = {"type": "action", "id": 7, "action": "release_session", "target": target}
    msg = kernel.session.msg("comm_msg", {"comm_id": comm_id, "data": data})
    kernel.shell_channel.send(on_subshell(msg, subshell_id))
    answer = iopub_until(
        kernel,
        lambda m: (
            m["msg_type"] == "comm_msg"
            and m["content"]["comm_id"] == comm_id
            and m["content"]["data"].get("type") == "action_result"
        ),
    )["content"]["data"]
    assert answer["id"] == 7 and answer["ok"] is False  # no such pool, and said at once
    # Only now is the cell let go.
    done = kernel.session.msg(
        "execute_request", {"code": "release.set()", "silent": True, "store_history": False}
    )
    kernel.shell_channel.send(on_subshell(done, subshell_id))
    iopub_until(
        kernel,
        lambda m: (
            m["msg_type"] == "status"
            and m["parent_header"].get("msg_id") == busy
            and m["content"]["execution_state"] == "idle"
        ),
    )
    kernel.control_channel.send(
        kernel.session.msg("delete_subshell_request", {"subshell_id": subshell_id})
    )
    kernel.get_control_msg(timeout=WAIT)
