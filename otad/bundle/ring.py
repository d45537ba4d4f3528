"""The fixed buffers decompressed image bytes are written into, hashed from and handed out of.

The decoder writes into the free part of the current slot, the caller of the verifier gets a
read-only view of what was written, and the same bytes go to the hashing thread, without a copy
anywhere. A slot is written again only after the hashing thread finished with everything it
held (:meth:`OutputRing.space` waits for that), so memory stays at ``slots * slot_size`` and
the hasher may lag behind the decoder by up to ``slots - 1`` slots without stalling it.

1 MiB slots: per slot the decoder and the hasher exchange the GIL and wake each other a few
times; at 256 KiB those hand-offs cost the decoding thread about 0.25 CPU-s per GiB more, while
decoding itself was as fast into 1 MiB as into 256 KiB, and 2 MiB slots or more of them gained
nothing measurable (reference machine, ``benchmarks/bundle_verify.py``).
"""

from __future__ import annotations

from typing import Final

from otad.bundle.digest import DONE, Digests, Pending

__layer__ = "pure"

SLOT_SIZE: Final = 1 << 20
SLOTS: Final = 4
_HAND_OVER: Final = 256 << 10  # unhashed bytes in a slot that are handed over without waiting
# for the slot to fill (a slow download still keeps the hasher busy)


class OutputRing:
    """``slots`` buffers of ``slot_size`` bytes, written in turn; see the module docstring."""

    def __init__(
        self,
        digests: Digests | None,
        stream: int,
        *,
        slots: int = SLOTS,
        slot_size: int = SLOT_SIZE,
    ) -> None:
        """``digests=None``: nothing hashes the output; slots are reused right away."""
        self._digests = digests
        self._stream = stream
        self._views = [memoryview(bytearray(slot_size)) for _ in range(slots)]
        self._busy: list[Pending] = [DONE] * slots  # last hand-over reading each slot
        self._slot_size = slot_size
        self._slot = 0
        self._pos = 0  # written so far in the current slot
        self._handed = 0  # of those, handed to the hasher

    def space(self) -> memoryview:
        """Writable free space in the current slot (never empty); moves on when it is full."""
        if self._pos == self._slot_size:
            self.flush()
            self._slot = (self._slot + 1) % len(self._views)
            self._pos = self._handed = 0
            self._busy[self._slot].wait()  # the hasher is done with what this slot held
            self._busy[self._slot] = DONE
        return self._views[self._slot][self._pos :]

    def commit(self, size: int) -> memoryview:
        """Record ``size`` bytes written at the start of :meth:`space`; a read-only view of them."""
        start = self._pos
        self._pos += size
        if self._pos - self._handed >= _HAND_OVER:
            self.flush()
        return self._views[self._slot][start : self._pos].toreadonly()

    def flush(self) -> None:
        """Hand every written byte not yet handed over to the hasher."""
        if self._digests is None:
            self._handed = self._pos
        elif self._pos > self._handed:
            view = self._views[self._slot][self._handed : self._pos]
            pending = self._digests.update(self._stream, view)
            if pending is not DONE:  # DONE: copied (small piece); an earlier hand-over may run
                self._busy[self._slot] = pending
            self._handed = self._pos
