"""The replies a pool kernel keeps for a client over a gateway's websocket (runtime side):
kept only when hello asks for it, bounded, forgotten once acknowledged, sent again on
request. The comm endpoint runs as in a kernel, on a stand-in comm object (no kernel: the
integration tests in test_gateway.py drive the real path through real gateways)."""

from __future__ import annotations

from typing import Any

from dspex_jupyter import protocol
from dspex_jupyter.core.errors import GatewayError, GatewayReplyLost
from dspex_jupyter.runtime.kernel import _on_comm_open
from dspex_jupyter.runtime.reply_log import KEPT, NOT_KEPT, RUNNING, UNKNOWN, ReplyLog


class RecordingComm:
    """What ipykernel's Comm offers the endpoint: on_msg and send (recorded)."""

    def __init__(self) -> None:
        self.sent: list[tuple[dict[str, Any], list[Any]]] = []
        self.handler: Any = None

    def on_msg(self, handler: Any) -> None:
        self.handler = handler

    def send(self, data: dict[str, Any], buffers: list[Any] | None = None) -> None:
        self.sent.append((data, list(buffers or [])))

    def request(self, op: str, args: dict[str, Any], **extra: Any) -> dict[str, Any]:
        message = {**protocol.make_request(op, args), **extra}
        before = len(self.sent)
        self.handler({"content": {"data": message}, "buffers": []})
        replies = [data for data, _ in self.sent[before:] if data.get("id") == message["id"]]
        assert len(replies) == 1, replies
        return replies[0]


def open_comm() -> RecordingComm:
    comm = RecordingComm()
    _on_comm_open(comm, {})
    return comm


def test_a_comm_keeps_nothing_unless_hello_asks():
    comm = open_comm()
    assert comm.request("hello", {})["ok"]
    warm = comm.request("warmup", {"modules": ["json"]})
    asked = comm.request("replies", {"ids": [warm["id"]]})
    assert not asked["ok"] and "keeps no replies" in asked["error"]["message"]


def test_kept_replies_are_sent_again_and_forgotten_once_acknowledged():
    comm = open_comm()
    assert comm.request("hello", {"keep_replies": True})["ok"]
    first = comm.request("warmup", {"modules": ["json"]})
    second = comm.request("warmup", {"modules": ["os"]})
    never = protocol.new_request_id()

    before = len(comm.sent)
    status = comm.request("replies", {"ids": [first["id"], never], "resend": True})
    assert status["result"] == {first["id"]: KEPT, never: UNKNOWN}
    resent = [data for data, _ in comm.sent[before:] if data.get("id") == first["id"]]
    assert resent == [first]  # the same reply, once, before the status

    # The next request acknowledges the first: the kernel forgets it, keeps the second.
    status = comm.request("replies", {"ids": [first["id"], second["id"]]}, acked=[first["id"]])
    assert status["result"] == {first["id"]: NOT_KEPT, second["id"]: KEPT}


def test_the_log_is_bounded_in_count_and_bytes():
    log = ReplyLog(max_kept=3, max_bytes=100)
    log.answered("off", {"id": "off"}, [], None)
    assert log.status("off") == UNKNOWN  # disabled: nothing recorded
    log.enabled = True
    log.started("a")
    assert log.status("a") == RUNNING
    for name in "abcd":
        log.answered(name, {"id": name}, [b"x" * 10], None)
    assert [log.status(n) for n in "abcd"] == [NOT_KEPT, KEPT, KEPT, KEPT]  # count bound
    log.answered("big", {"id": "big"}, [b"x" * 101], None)  # over the byte bound: not kept
    assert log.status("big") == NOT_KEPT and log.kept_bytes == 30
    log.answered("e", {"id": "e"}, [b"x" * 90], None)  # evicts the oldest until it fits
    assert [log.status(n) for n in "bcde"] == [NOT_KEPT, NOT_KEPT, KEPT, KEPT]
    assert log.kept_bytes == 100
    assert log.kept("e") == ({"id": "e"}, [b"x" * 90], None)
    log.acknowledge(["d", "e", 7])  # a non-string id is ignored
    assert log.kept_bytes == 0 and log.kept("e") is None


def test_a_lost_reply_is_a_gateway_error_with_a_hint():
    error = GatewayReplyLost("lost")
    assert isinstance(error, GatewayError) and "retry" in error.hint
