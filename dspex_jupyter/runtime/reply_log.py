"""Replies a pool kernel keeps for a client whose connection may drop (a gateway's websocket).

A gateway replays only what it buffered after it noticed a dropped websocket: a reply
already on the wire is lost. The client then asks, by request id, what became of each
request it still waits on (op ``replies``); this log answers from what it kept. Keeping
is off unless the client asks for it at ``hello`` (local and SSH kernels pay nothing),
bounded in count and bytes, and a reply is forgotten once the client acknowledges it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

MAX_KEPT = 64
MAX_KEPT_BYTES = 64 * 1024 * 1024
# Ids of requests answered but no longer kept: enough to tell "its reply was not kept"
# from "never received" (only the ids: a few kilobytes).
MAX_FORGOTTEN = 4096

KEPT, RUNNING, NOT_KEPT, UNKNOWN = "kept", "running", "not_kept", "unknown"


def _nbytes(buffers: list[Any]) -> int:
    return sum(memoryview(b).nbytes for b in buffers)


class ReplyLog:
    """The kept replies of one comm, by request id, oldest first."""

    def __init__(self, max_kept: int = MAX_KEPT, max_bytes: int = MAX_KEPT_BYTES) -> None:
        self.enabled = False
        self.max_kept = max_kept
        self.max_bytes = max_bytes
        self.kept_bytes = 0
        self._running: set[str] = set()
        # id -> (reply, buffers, chunk_max, nbytes)
        self._kept: OrderedDict[str, tuple[dict[str, Any], list[Any], int | None, int]] = (
            OrderedDict()
        )
        self._answered: OrderedDict[str, None] = OrderedDict()  # answered, reply not kept

    def started(self, req_id: str) -> None:
        if self.enabled and req_id:
            self._running.add(req_id)

    def answered(
        self, req_id: str, reply: dict[str, Any], buffers: list[Any], chunk_max: int | None
    ) -> None:
        """Keep ``reply`` (as sent) until acknowledged, within the bounds."""
        if not self.enabled or not req_id:
            return
        self._running.discard(req_id)
        size = _nbytes(buffers)
        if size > self.max_bytes:  # never kept: the client is told it was not
            self._remember_answered(req_id)
            return
        self._kept[req_id] = (reply, list(buffers), chunk_max, size)
        self.kept_bytes += size
        while len(self._kept) > self.max_kept or self.kept_bytes > self.max_bytes:
            old_id, (_, _, _, old_size) = self._kept.popitem(last=False)
            self.kept_bytes -= old_size
            self._remember_answered(old_id)

    def acknowledge(self, req_ids: Any) -> None:
        """The client has these replies: forget them."""
        if not isinstance(req_ids, list):
            return
        for req_id in req_ids:
            entry = self._kept.pop(req_id, None) if isinstance(req_id, str) else None
            if entry is not None:
                self.kept_bytes -= entry[3]
                self._remember_answered(req_id)

    def status(self, req_id: str) -> str:
        if req_id in self._kept:
            return KEPT
        if req_id in self._running:
            return RUNNING
        if req_id in self._answered:
            return NOT_KEPT
        return UNKNOWN

    def kept(self, req_id: str) -> tuple[dict[str, Any], list[Any], int | None] | None:
        entry = self._kept.get(req_id)
        return None if entry is None else entry[:3]

    def _remember_answered(self, req_id: str) -> None:
        self._answered[req_id] = None
        while len(self._answered) > MAX_FORGOTTEN:
            self._answered.popitem(last=False)
