"""Parts of an agent made from its config: bootloader backend, slot layout, rebooter; malloc.

Shared by the daemon and the one-shot commands (``otad agent install``, ``status``, ...) so that
those do not import the MQTT session they do not use.
"""

from __future__ import annotations

import asyncio
import ctypes
from collections.abc import Awaitable, Callable

import structlog

from otad.agent.bootloader import Bootloader
from otad.agent.config import AgentConfig
from otad.agent.crashpoints import CrashPoints
from otad.agent.slots import SlotLayout, SlotSpec
from otad.errors import BootloaderError, RebootFailed

__layer__ = "service"

log = structlog.get_logger(__name__)

# glibc mallopt parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_MMAP_THRESHOLD = 512 * 1024
_TRIM_THRESHOLD = 1024 * 1024
ENV_HALF_WRITTEN = "bootloader_env_half_written"  # the crash point inside an env copy write


def limit_malloc_arenas(count: int = 1) -> bool:
    """Bound what glibc's malloc keeps for this process (call once, at the process entry point).

    * one arena: glibc gives every thread that allocates its own arena and keeps freed chunks
      there; with the network on the event loop and the disk and hash threads handing buffers
      to each other, a 1 GiB install grew the peak RSS by ~70 MiB of retained free memory;
    * a fixed mmap threshold: by default glibc raises it after the first large free, so what
      stays resident after an install wandered by ~8 MiB between runs. It is fixed at 512 KiB:
      the download's 256 KiB blocks, allocated and freed over and over, reuse heap memory (as
      their own mappings, fresh pages were faulted in for every block: the event loop spent
      ~0.3 CPU-s per 340 MiB bundle on them), and bigger buffers (the zstd window) are their
      own mappings, returned when freed.

    A no-op (False) where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL(None)
        ok = libc.mallopt(_M_ARENA_MAX, count) == 1
        ok = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1 and ok
        return bool(libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1 and ok)
    except (OSError, AttributeError):
        return False


def make_bootloader(config: AgentConfig) -> Bootloader:
    """The backend the config names."""
    kind = config.bootloader.type
    fault = None
    if ENV_HALF_WRITTEN in config.testing.crash_points:
        # test-only: end the process with a genuinely torn env copy on disk (issue 8's matrix)
        crash = CrashPoints(config.testing.crash_points, config.testing.exit_code)
        fault = crash.hit
    if kind == "sim":
        from otad.agent.bootloader.sim import SimBootloader

        return SimBootloader(config.sim_state_path, attempts=config.bootloader.tries)
    if kind == "grub":
        from otad.agent.bootloader.grub import GrubBootloader

        return GrubBootloader(config.bootloader.grub_env_dir, fault=fault)
    if kind == "uboot":
        from otad.agent.bootloader.uboot import UBootBootloader

        return UBootBootloader(
            config.bootloader.fw_env_config,
            attempts=config.bootloader.tries,
            fault=fault,
            default_env=config.bootloader.uboot_default_env,
        )
    raise BootloaderError(f"agent: unknown bootloader type {kind!r}")


def make_layout(config: AgentConfig) -> SlotLayout:
    slots = config.slots
    return SlotLayout(
        {
            s.name: SlotSpec(s.name, path=s.path, label=s.label)
            for s in (slots.by_name("A"), slots.by_name("B"))
        }
    )


def command_rebooter(command: tuple[str, ...]) -> Callable[[], Awaitable[None]]:
    """A rebooter that runs ``command`` (default ``systemctl reboot``)."""

    async def reboot() -> None:
        shown = " ".join(command)
        log.info("reboot_command_started", command=shown)
        try:
            proc = await asyncio.create_subprocess_exec(*command)
        except OSError as exc:
            raise RebootFailed(f"reboot: cannot run {shown!r}: {exc.strerror}") from exc
        code = await proc.wait()
        if code != 0:
            raise RebootFailed(f"reboot: {shown!r} exited with status {code}")

    return reboot
