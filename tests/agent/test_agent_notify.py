"""sd_notify over a real AF_UNIX datagram socket, and the daemon's READY/STATUS/WATCHDOG use."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from plugins.agent_env import wait_reported

from otad.agent.notify import Notifier, watchdog_interval


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.setblocking(False)
    yield sock
    sock.close()


def received(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


def test_notify_sends_datagrams(notify_socket: socket.socket, tmp_path: Path) -> None:
    n = Notifier(str(tmp_path / "notify"))
    assert n.enabled
    assert n.ready("recovered")
    assert n.status("downloading 10%")
    assert not n.status("downloading 10%")  # unchanged status is not re-sent
    assert n.watchdog() and n.stopping()
    assert received(notify_socket) == [
        "READY=1\nSTATUS=recovered",
        "STATUS=downloading 10%",
        "WATCHDOG=1",
        "STOPPING=1",
    ]


def test_notify_abstract_socket_name() -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"otad-test-{id(sock)}"
    sock.bind("\0" + name)
    try:
        assert Notifier("@" + name).send("READY=1")
        assert sock.recv(100) == b"READY=1"
    finally:
        sock.close()


def test_notify_is_a_no_op_without_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    assert not n.enabled and not n.ready() and not n.watchdog()


def test_notify_missing_socket_never_raises(tmp_path: Path) -> None:
    assert not Notifier(str(tmp_path / "gone")).send("READY=1")


def test_notify_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert watchdog_interval() is None  # meant for another process
    monkeypatch.delenv("WATCHDOG_PID")
    monkeypatch.setenv("WATCHDOG_USEC", "nonsense")
    assert watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_USEC")
    assert watchdog_interval() is None


async def test_notify_agent_ready_status_and_watchdog(
    cloud: Any,
    make_device: Any,
    notify_socket: socket.socket,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # ping every 0.1 s
    dev = make_device("dev1")
    await dev.start(notifier=Notifier(str(tmp_path / "notify")))
    await asyncio.sleep(0.5)
    await dev.stop()
    messages = received(notify_socket)
    assert messages[0].startswith("READY=1\nSTATUS=recovered")
    assert messages.count("WATCHDOG=1") >= 2
    assert "STATUS=idle" in messages and messages[-1] == "STOPPING=1"


def test_notify_status_stays_one_line(notify_socket: socket.socket, tmp_path: Path) -> None:
    notifier = Notifier(str(tmp_path / "notify"))
    notifier.status("failed job j1\nWATCHDOG_USEC=1\rMAINPID=1")
    assert received(notify_socket) == ["STATUS=failed job j1 WATCHDOG_USEC=1 MAINPID=1"]


async def test_notify_a_jobid_from_the_shadow_cannot_add_notify_assignments(
    cloud: Any, make_device: Any, notify_socket: socket.socket, tmp_path: Path
) -> None:
    """A desired entry whose jobId carries a newline: before, the failure's STATUS= line
    carried it verbatim and systemd would have applied ``WATCHDOG_USEC=1`` (killing the
    agent at once, and again at every restart on the same document)."""
    dev = make_device("dev1")
    await dev.start(notifier=Notifier(str(tmp_path / "notify")))
    job_id = "j1\nWATCHDOG_USEC=1\nMAINPID=1"
    await cloud.set_desired("dev1", {"software": {"version": "2.0", "jobId": job_id}})
    sw = await wait_reported(cloud, "dev1", lambda s: s["state"] == "failed")
    await dev.stop()
    assert sw.get("jobId") is None and sw["error"]["code"] == "desired_invalid", sw
    messages = received(notify_socket)
    assert not [m for m in messages if "WATCHDOG_USEC" in m or "MAINPID" in m], messages
    assert "STATUS=failed" in messages, messages
