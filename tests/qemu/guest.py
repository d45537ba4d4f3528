"""One QEMU guest booted with ``qemu/run``: its process, its serial log, and waits on that log.

The serial console goes to a file (``qemu/run --log``); waits read the file incrementally and match
regular expressions line by line, so a test can ask "has the guest booted slot B since I asked
for the update?" without racing the console. Every wait has a deadline; on a timeout the error
names the pattern and the last lines of the console.

A wait also ends early, with :class:`EarlyKernelHang`, when the kernel has printed nothing for
``EARLY_HANG_SILENCE`` seconds before it started userspace. Under TCG the guest kernel very rarely
stops for good in its early initcalls (seen once in about 80 boots, after "pnp: PnP ACPI: found
6 devices"); its longest normal pause there is under 1 s. No otad code runs at that point, so a
test may power-cycle once on its first power-on (:meth:`Guest.power_on`); a hang anywhere else
fails the test with that name, instead of a generic timeout minutes later.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RUN = REPO / "qemu" / "run"

# Lines the image prints (qemu/files/overlay/etc/systemd/system/otad-probe.service, grub.cfg).
PROBE = re.compile(r"OTAD-PROBE: booted slot=(?P<slot>[AB]) version=(?P<version>\S+)")
KERNEL_START = re.compile(r"Linux version \d")
PANIC = re.compile(r"Kernel panic - not syncing")
USERSPACE_START = re.compile(r"Run \S+ as init process|systemd\[1\]")
EARLY_HANG_SILENCE = 60.0


class GuestTimeout(AssertionError):
    """A wait on the serial console passed its deadline (an assertion: the test failed)."""


class EarlyKernelHang(GuestTimeout):
    """The kernel went silent before starting userspace (a TCG hang, see the module doc)."""


@dataclass
class Boot:
    """One boot seen on the console: which slot and version came up, and when (monotonic)."""

    slot: str
    version: str
    at: float


@dataclass
class Guest:
    disk: Path
    log_path: Path
    broker_port: int
    store_port: int
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    _offset: int = 0
    _partial: str = ""
    _last_output_at: float = 0.0
    _in_kernel: bool = False
    early_hang_silence: float = EARLY_HANG_SILENCE
    early_hangs: int = 0
    lines: list[tuple[float, str]] = field(default_factory=list)

    @classmethod
    def from_image(cls, image: Path, workdir: Path, *, broker_port: int, store_port: int) -> Guest:
        """A guest on its own sparse copy of the built disk (tests never change the original)."""
        workdir.mkdir(parents=True, exist_ok=True)
        disk = workdir / "disk.img"
        subprocess.run(["cp", "--sparse=always", str(image), str(disk)], check=True)
        return cls(disk, workdir / "serial.log", broker_port, store_port)

    def start(self) -> None:
        """Power on (append to the same serial log, so one file tells the whole story)."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("guest already running")
        with self.log_path.open("a") as f:
            f.write(f"\n===== power on at {time.strftime('%H:%M:%S')} =====\n")
        self._offset = self.log_path.stat().st_size
        self._partial = ""
        self._in_kernel = False
        self.process = self._spawn()
        self.started_at = self._last_output_at = time.monotonic()

    def _spawn(self) -> subprocess.Popen[bytes]:
        """QEMU itself (``qemu/run``), its serial console appended to the log."""
        with (self.log_path.parent / "qemu.stderr").open("ab") as stderr:
            return subprocess.Popen(
                [
                    str(RUN),
                    "--disk",
                    str(self.disk),
                    "--log",
                    str(self.log_path),
                    "--broker-port",
                    str(self.broker_port),
                    "--store-port",
                    str(self.store_port),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )

    async def power_on(self, within: float) -> tuple[int, Boot]:
        """Power on and wait for the boot marker; power-cycle once after an early kernel hang."""
        mark = self.mark()
        self.start()
        try:
            return await self.wait_boot(within, since=mark)
        except EarlyKernelHang as hang:
            self.early_hangs += 1
            self.power_cut()
            with self.log_path.open("a") as f:
                f.write(f"\n===== harness: {hang.args[0].splitlines()[0]}; power-cycled =====\n")
            mark = self.mark()
            self.start()
            return await self.wait_boot(within, since=mark)

    def power_cut(self) -> None:
        """SIGKILL QEMU: the guest gets no chance to flush or unmount (a real power cut)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)
        self.process = None

    def stop(self) -> None:
        self.power_cut()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _read_new(self) -> list[tuple[float, str]]:
        new: list[tuple[float, str]] = []
        try:
            with self.log_path.open("rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return new
        self._offset += len(chunk)
        now = time.monotonic()
        if chunk:
            self._last_output_at = now
        text = self._partial + chunk.decode("utf-8", "replace").replace("\r", "")
        *complete, self._partial = text.split("\n")
        for line in complete:
            new.append((now, line))
            if KERNEL_START.search(line):
                self._in_kernel = True
            elif USERSPACE_START.search(line):
                self._in_kernel = False
        self.lines.extend(new)
        return new

    async def wait_for(
        self, pattern: re.Pattern[str], within: float, *, since: int | None = None
    ) -> tuple[int, re.Match[str]]:
        """Wait for a console line matching ``pattern``; return (line index, match).

        ``since``: only lines with an index >= since count (default: lines not yet seen).
        """
        start_index = len(self.lines) if since is None else since
        deadline = time.monotonic() + within
        checked = start_index
        while True:
            self._read_new()
            while checked < len(self.lines):
                m = pattern.search(self.lines[checked][1])
                if m:
                    return checked, m
                checked += 1
            silent = time.monotonic() - self._last_output_at
            if self._in_kernel and self.running and silent > self.early_hang_silence:
                raise EarlyKernelHang(
                    f"early kernel hang: no console output for {silent:.0f} s before userspace "
                    f"while waiting for {pattern.pattern!r}; last lines:\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                raise GuestTimeout(
                    f"serial console: no line matching {pattern.pattern!r} within {within:.0f} s;"
                    f" last lines:\n{self.tail()}"
                )
            if self.process is not None and self.process.poll() is not None:
                raise GuestTimeout(
                    f"QEMU exited with {self.process.returncode} while waiting for "
                    f"{pattern.pattern!r}; last lines:\n{self.tail()}"
                )
            await asyncio.sleep(0.5)

    async def wait_boot(self, within: float, *, since: int | None = None) -> tuple[int, Boot]:
        index, m = await self.wait_for(PROBE, within, since=since)
        return index, Boot(m["slot"], m["version"], self.lines[index][0])

    def mark(self) -> int:
        """The index of the next console line, for ``since=``."""
        self._read_new()
        return len(self.lines)

    def count(self, pattern: re.Pattern[str], since: int = 0) -> int:
        self._read_new()
        return sum(1 for _, line in self.lines[since:] if pattern.search(line))

    def tail(self, n: int = 40) -> str:
        self._read_new()
        return "\n".join(line for _, line in self.lines[-n:])

    def save_artifacts(self, dest: Path) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        for f in (self.log_path, self.log_path.parent / "qemu.stderr"):
            if f.exists():
                shutil.copy2(f, dest / f.name)
