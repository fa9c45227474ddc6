"""The shared-memory ring: every reader gets every message once, in order, across many wraps
of the ring; a payload larger than a slot is announced for the pipe; the writer waits for the
slowest reader before reusing a slot, and gives up when a reader is dead."""

from __future__ import annotations

import threading

import pytest

from pagedllm.executor.shm_broadcast import ShmBroadcast


def test_readers_get_every_message_in_order_and_large_ones_go_by_pipe():
    writer = ShmBroadcast(num_readers=2, num_slots=2, slot_bytes=64)
    readers = [ShmBroadcast.attach(writer.handle(), rank) for rank in range(2)]
    try:
        assert all(r.poll() is None for r in readers)
        for i in range(7):
            payload = bytes([i]) * (i + 1)
            assert writer.write(payload, lambda: True)
            assert [r.poll() for r in readers] == [payload, payload]
            assert all(r.poll() is None for r in readers)
        assert not writer.write(b"x" * 65, lambda: True)
        assert [r.poll() for r in readers] == [True, True]
    finally:
        for reader in readers:
            reader.close()
        writer.close(unlink=True)


def test_writer_waits_for_the_slowest_reader_and_stops_if_it_died():
    writer = ShmBroadcast(num_readers=2, num_slots=2, slot_bytes=16)
    fast, slow = (ShmBroadcast.attach(writer.handle(), rank) for rank in range(2))
    try:
        for i in range(2):
            writer.write(bytes([i]), lambda: True)
            assert fast.poll() == bytes([i])
        # Both slots hold messages the slow reader has not read: the third write must wait.
        done = threading.Event()
        thread = threading.Thread(target=lambda: (writer.write(b"\x02", lambda: True), done.set()))
        thread.start()
        assert not done.wait(0.2)
        assert slow.poll() == b"\x00"
        assert done.wait(5.0)
        thread.join()
        assert slow.poll() == b"\x01" and slow.poll() == b"\x02" and fast.poll() == b"\x02"
        writer.write(b"\x03", lambda: True)
        writer.write(b"\x04", lambda: True)
        with pytest.raises(RuntimeError, match="died"):
            writer.write(b"\x05", lambda: False)
    finally:
        fast.close()
        slow.close()
        writer.close(unlink=True)
