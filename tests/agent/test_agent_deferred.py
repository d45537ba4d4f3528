"""A new desired state that comes while the running job cannot be cancelled (it is starting,
or past its download, or waiting for the power to go) is acted on once the job can be, or once
it ended; and a job replaced while it journals its own failure does not block its successor.

These tests watch the agent itself, not the replica: asking the replica for the document (as
``wait_reported`` does) publishes a ``get`` whose answer hands the agent a fresh document, which
would hide a document the agent put aside and never looked at again. A real device gets
documents only on (re)connect and on a delta."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from plugins.agent_env import offer_bundle

from otad.agent.journal import Journal
from otad.agent.machine import Event, State


async def until(condition: Callable[[], bool], within: float) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_agent_replacement_during_the_job_start_cancels_it_before_its_download(
    cloud: Any, cloud_dir: Any, make_device: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job cannot be cancelled while it journals its start (fsyncs; slowed here to make the
    window certain). The replacement used to be dropped there: the replaced job installed and
    rebooted the device into it."""
    real_begin = Journal.begin

    def slow_begin(journal: Journal, *args: Any, **kwargs: Any) -> Any:
        time.sleep(1.0)
        return real_begin(journal, *args, **kwargs)

    monkeypatch.setattr(Journal, "begin", slow_begin)
    dev = make_device("dev1")
    agent = await dev.start()
    _, first = await offer_bundle(cloud, cloud_dir, tmp_path, image_size=256 * 1024, publish=False)
    _, second = await offer_bundle(
        cloud,
        cloud_dir,
        tmp_path,
        version="3.0",
        job="j2",
        seed=9,
        image_size=256 * 1024,
        publish=False,
    )
    await cloud.set_desired("dev1", {"software": first})
    await until(lambda: agent.jobs_started == 1, 10)
    await asyncio.sleep(0.2)  # j1 is inside begin()
    await cloud.set_desired("dev1", {"software": second})
    await dev.wait_reboot_requested(within=30)
    record = agent.runner.record
    assert record is not None and (record.job_id, record.state) == ("j2", State.REBOOTING)
    assert agent.jobs_started == 2 and dev.reboot_requests == 1


async def test_agent_replacement_while_waiting_for_the_reboot_runs_after_the_reboot_failed(
    cloud: Any, cloud_dir: Any, make_device: Any, tmp_path: Path
) -> None:
    """The reboot command returned but the system stayed up; a new desired state came while
    the agent waited for the power to go. Once the reboot counts as failed, the new job runs."""
    dev = make_device("dev1", config={"reboot_command": ["true"], "reboot_timeout": 3.0})
    agent = await dev.start(rebooter=None)
    await offer_bundle(cloud, cloud_dir, tmp_path, image_size=256 * 1024)
    await until(agent.rebooting.is_set, 30)
    await offer_bundle(
        cloud, cloud_dir, tmp_path, version="3.0", job="j2", seed=9, image_size=256 * 1024
    )
    await until(lambda: agent.jobs_started == 2, 30)
    await until(lambda: agent.rebooting.is_set(), 30)  # j2 switched and asked for its reboot
    record = agent.runner.record
    assert record is not None and (record.job_id, record.state) == ("j2", State.REBOOTING)


async def test_agent_replacement_while_a_failed_job_journals_its_end_then_runs(
    cloud: Any, cloud_dir: Any, make_device: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """j1 fails (404) and journals ``failed`` (a slow fsync here) when j2 replaces it. The
    cancelled j1 used to end before that write: j2's begin() found j1 still downloading, so
    j2 was reported failed (journal_error) and never ran."""
    real_advance = Journal.advance
    loop = asyncio.get_running_loop()
    writing = asyncio.Event()

    def slow_advance(journal: Journal, record: Any, event: Any, **changes: Any) -> Any:
        if Event(event) == Event.FAILED:
            loop.call_soon_threadsafe(writing.set)
            time.sleep(1.0)
        return real_advance(journal, record, event, **changes)

    monkeypatch.setattr(Journal, "advance", slow_advance)
    dev = make_device("dev1")
    agent = await dev.start()
    _, good = await offer_bundle(
        cloud,
        cloud_dir,
        tmp_path,
        version="3.0",
        job="j2",
        image_size=256 * 1024,
        publish=False,
    )
    missing = {
        "version": "2.0",
        "jobId": "j1",
        "url": good["url"].replace("/v1/artifacts/", "/v1/artifacts/0"),  # 404
    }
    await cloud.set_desired("dev1", {"software": missing})
    await asyncio.wait_for(writing.wait(), 20)
    await cloud.set_desired("dev1", {"software": good})
    await dev.wait_reboot_requested(within=30)
    record = agent.runner.record
    assert record is not None and (record.job_id, record.state) == ("j2", State.REBOOTING)
