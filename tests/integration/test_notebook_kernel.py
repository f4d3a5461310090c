"""In a real ipykernel: widget updates made on a background thread reach the frontend, and
the ``dspex.lab`` comm answers as its protocol says. The test plays the frontend."""

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
    assert set(state) == {"time", "pools", "runs", "gpu", "sessions_active"}
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
