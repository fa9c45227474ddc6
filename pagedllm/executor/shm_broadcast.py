"""One writer, N readers: the engine's calls reach every rank through one ring of slots in
shared memory, written once, instead of one pipe message per rank.

Slot layout (little-endian): seq int64 | nbytes int64 | one read flag byte per reader, padded
to 8 | payload (slot_bytes). The writer waits until every reader has flagged the slot's last
message (or the slot was never used), writes the payload and its length, clears the flags and
publishes by writing seq last. Reader r waits for the seq it expects next, copies the payload
out and sets its flag. A payload larger than a slot is published as nbytes = -1 and travels
over the rank's pipe instead (readers then take it from there).

Ordering relies on the stores being seen in program order, which x86-64 guarantees (TSO).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from multiprocessing import shared_memory

_HEADER = struct.Struct("<qq")
_VIA_PIPE = -1
# On GPUs, readers check for a new message in a tight loop this long after the last one (a
# step's message follows its predecessor within a millisecond while requests run), then sleep
# between checks so an idle engine costs no CPU. On CPU the ranks need every core for compute.
GPU_SPIN_S = 0.005
_MAX_SLEEP_S = 0.001


class ShmBroadcast:
    def __init__(self, num_readers: int, num_slots: int = 4, slot_bytes: int = 1 << 20,
                 name: str | None = None, reader_rank: int | None = None, spin_s: float = 0.0) -> None:
        self.num_readers = num_readers
        self.num_slots = num_slots
        self.slot_bytes = slot_bytes
        self.flags_bytes = -(-num_readers // 8) * 8
        self.slot_stride = _HEADER.size + self.flags_bytes + slot_bytes
        self.reader_rank = reader_rank
        self.spin_s = spin_s
        if name is None:
            self.shm = shared_memory.SharedMemory(create=True, size=self.slot_stride * num_slots)
            self.shm.buf[:] = bytes(len(self.shm.buf))
        else:
            self.shm = _attach(name)
        self._next = 0
        """Messages written (writer) or read (reader) so far."""
        self._last_message = time.monotonic()

    def handle(self) -> tuple[str, int, int, int]:
        """What a reader needs to attach: ShmBroadcast(*handle[1:], name=handle[0], reader_rank=r)."""
        return self.shm.name, self.num_readers, self.num_slots, self.slot_bytes

    @classmethod
    def attach(cls, handle: tuple[str, int, int, int], reader_rank: int, spin_s: float = 0.0) -> ShmBroadcast:
        name, num_readers, num_slots, slot_bytes = handle
        return cls(num_readers, num_slots, slot_bytes, name=name, reader_rank=reader_rank, spin_s=spin_s)

    def write(self, payload: bytes, readers_alive: Callable[[], bool]) -> bool:
        """Publishes payload to every reader; False (nothing for the readers to read but a
        marker) when it is too large for a slot, so the caller sends it over the pipes."""
        buf = self.shm.buf
        offset = (self._next % self.num_slots) * self.slot_stride
        flags = offset + _HEADER.size
        if self._next >= self.num_slots:
            sleep_s = 0.0
            while any(buf[flags + r] == 0 for r in range(self.num_readers)):
                if not readers_alive():
                    raise RuntimeError("a reader of the shared-memory broadcast died")
                time.sleep(sleep_s)
                sleep_s = min(_MAX_SLEEP_S, sleep_s * 2 or 1e-5)
        fits = len(payload) <= self.slot_bytes
        data = offset + _HEADER.size + self.flags_bytes
        if fits:
            buf[data : data + len(payload)] = payload
        buf[flags : flags + self.num_readers] = bytes(self.num_readers)
        self._next += 1
        # Publish: the length and sequence number last, after the payload is in place.
        _HEADER.pack_into(buf, offset, 0, len(payload) if fits else _VIA_PIPE)
        struct.pack_into("<q", buf, offset, self._next)
        return fits

    def poll(self) -> bytes | None | bool:
        """Reader: the next payload, True when the next message travels over the pipe, or
        None when no message is ready."""
        buf = self.shm.buf
        offset = (self._next % self.num_slots) * self.slot_stride
        seq, nbytes = _HEADER.unpack_from(buf, offset)
        if seq != self._next + 1:
            return None
        data = offset + _HEADER.size + self.flags_bytes
        payload: bytes | bool = True if nbytes == _VIA_PIPE else bytes(buf[data : data + nbytes])
        assert self.reader_rank is not None
        buf[offset + _HEADER.size + self.reader_rank] = 1
        self._next += 1
        self._last_message = time.monotonic()
        return payload

    def wait_sleep(self, sleep_s: float) -> float:
        """Reader's back-off between polls: none while messages came recently, then growing
        sleeps; returns the next sleep."""
        if time.monotonic() - self._last_message < self.spin_s:
            return 0.0
        time.sleep(sleep_s)
        return min(_MAX_SLEEP_S, sleep_s * 2 or 1e-5)

    def close(self, unlink: bool = False) -> None:
        try:
            self.shm.close()
            if unlink:
                self.shm.unlink()
        except (FileNotFoundError, BufferError):
            pass


def _attach(name: str) -> shared_memory.SharedMemory:
    try:
        return shared_memory.SharedMemory(name=name, track=False)  # type: ignore[call-arg]
    except TypeError:
        # Python < 3.13 registers the segment with the resource tracker, which spawned ranks
        # share with the engine's process: a second registration of the name is a no-op, and
        # the engine's unlink at shutdown removes it.
        return shared_memory.SharedMemory(name=name)
