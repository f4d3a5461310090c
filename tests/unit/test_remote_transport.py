"""Pieces of big buffers, the encryption policy of remote pools, and where a remote kernel
binds: the parts of kernels-on-other-machines that need no SSH host."""

from __future__ import annotations

import pytest

from dspex_jupyter import exchange
from dspex_jupyter.core.errors import InvalidSpec, TransportNotEncrypted
from dspex_jupyter.core.kernel_source import encryption_policy
from dspex_jupyter.core.spec import PoolSpec
from dspex_jupyter.runtime.remote_launcher import ANY_ADDRESS, bind_address


def _roundtrip(buffers, chunk_bytes, drop=None):
    sent = []
    exchange.send_in_pieces(lambda d, b: sent.append((d, b)), {"id": "x"}, buffers, chunk_bytes)
    receiver = exchange.PieceReceiver()
    for data, bufs in sent[:-1]:
        if data["seq"] != drop:
            receiver.piece(data, bufs)
    final, final_buffers = sent[-1]
    return sent, receiver.take(final, final_buffers)


def test_big_buffers_go_in_bounded_pieces_and_come_back_equal():
    buffers = [b"a" * 25, b"", bytearray(b"b" * 7), memoryview(b"c" * 10)]
    sent, back = _roundtrip(buffers, 8)
    assert [bytes(b) for b in back] == [bytes(b) for b in buffers]
    assert all(sum(memoryview(b).nbytes for b in bufs) <= 8 for _, bufs in sent)
    assert sent[-1][0]["chunked"]["pieces"] == len(sent) - 1 and sent[-1][1] == []


def test_small_buffers_go_whole():
    sent, back = _roundtrip([b"abc"], 8)
    assert len(sent) == 1 and "chunked" not in sent[0][0] and back == [b"abc"]
    sent, _ = _roundtrip([b"a" * 100], None)  # a local kernel: never in pieces
    assert len(sent) == 1


def test_a_lost_piece_fails_the_value():
    with pytest.raises(exchange.ExchangeError, match="pieces were lost"):
        _roundtrip([b"a" * 40], 8, drop=2)


class _Spec:
    def __init__(self, provisioner=None, encryption=None):
        self.metadata = {}
        if provisioner:
            self.metadata["kernel_provisioner"] = {"provisioner_name": provisioner}
        if encryption:
            self.metadata["supported_encryption"] = encryption


def test_remote_pools_require_curve_unless_opted_out_by_name():
    assert encryption_policy("p", _Spec(), None) == "disabled"  # local: IPC sockets
    remote = _Spec("distributed-provisioner", ["curve"])
    assert encryption_policy("p", remote, None) == "required"
    plain = _Spec("distributed-provisioner")
    with pytest.raises(TransportNotEncrypted, match="allow_unencrypted='p'") as caught:
        encryption_policy("p", plain, None)
    assert caught.value.hint
    assert encryption_policy("p", plain, "p") == "auto"
    with pytest.raises(InvalidSpec, match="must be the pool's own name"):
        PoolSpec("p", kernel="k", allow_unencrypted="q")


def test_remote_kernel_binds_where_ssh_came_in():
    assert bind_address({"SSH_CONNECTION": "127.0.0.1 5000 127.0.0.2 22"}) == "127.0.0.2"
    assert bind_address({"DSPEX_KERNEL_IP": "10.0.0.5", "SSH_CONNECTION": "a b 1.2.3.4 22"}) == (
        "10.0.0.5"
    )
    assert bind_address({}) == ANY_ADDRESS  # a container: its address is not known ahead
