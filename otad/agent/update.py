"""The update runner: one job through the state machine, persisting before every side effect.

Safety order of a job (the machine in :mod:`otad.agent.machine` names the states)::

    journal downloading -> mark target bad -> stream: verify the signed manifest before the first
    image byte, decompress + hash while writing the inactive slot (disk work in a thread behind a
    bounded queue) -> journal installing -> fsync, re-read and hash the slot -> journal
    rebooting -> try_once(target) -> report rebooting -> reboot

and after the reboot (:meth:`UpdateRunner.recover` with the pure decision ``decide_recovery``)::

    target booted -> journal verifying -> health check -> mark good, raise the security floor,
    journal succeeded, report succeeded     | health failed -> journal rolling_back, mark the
    target bad, reboot; the old slot reports rolled_back  | old slot booted -> rolled_back /
    boot_failed

Bad input (every BundleError, an insecure URL, a malformed desired entry) ends the job as
``failed`` with the error's wire code; the target stays marked bad and nothing else changes.
So does an error of the switch itself (try_once or the journal write after it): the target is
marked bad again, the job fails, no reboot.
Cancelling the job's task (a new desired state) ends it as ``failed`` / ``job_cancelled``;
cancelling it with ``stopping`` set (the agent stops) leaves the journal as it is, so the next
start resumes the job.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import structlog

from otad.agent.bootloader import Bootloader, BootState, other_slot
from otad.agent.bootloader.durable import replace_file
from otad.agent.config import AgentConfig
from otad.agent.crashpoints import CrashPoints
from otad.agent.download import Downloader, Source, Transfer
from otad.agent.journal import Journal
from otad.agent.machine import (
    Event,
    JobRecord,
    RecoveryAction,
    State,
    Step,
    decide_recovery,
    reported_state,
)
from otad.agent.notify import Notifier
from otad.agent.pipeline import DiskPipe, FileTransfer
from otad.agent.settled import outlast, settled
from otad.agent.slots import SlotLayout, SlotWriter, open_target
from otad.bundle import Keyring, Manifest, StreamVerifier, VerifyPolicy, parse_preamble
from otad.errors import (
    BootloaderEnvCorrupt,
    BundleError,
    DesiredStateInvalid,
    HealthCheckFailed,
    JobCancelled,
    JournalCorrupt,
    KeyringError,
    OtadError,
    RebootFailed,
    SlotVerifyFailed,
    UrlExpired,
)
from otad.logs import redact_url

__layer__ = "service"

log = structlog.get_logger(__name__)

DEVICE_STATE = "device.json"
_JOB_ID_MAX = 128
# visible ASCII only: a jobId goes into logs and the systemd STATUS= line, where a newline
# would add notify assignments of the sender's choosing (WATCHDOG_USEC=1 stops the agent)
_JOB_ID = re.compile(rf"[\x21-\x7e]{{1,{_JOB_ID_MAX}}}")


def valid_job_id(value: object) -> bool:
    """Whether ``value`` can be a jobId (1-128 visible ASCII characters)."""
    return isinstance(value, str) and _JOB_ID.fullmatch(value) is not None


_FINAL_REPORT_WAIT = 10.0
_JOBS_KEPT = 64  # jobIds device.json remembers (up to 128 characters each)
# job states in which a device booted on the job's target runs the job's image, on trial
_ON_TARGET = frozenset({State.REBOOTING, State.VERIFYING})


# --- the desired entry ------------------------------------------------------------------------


@dataclass(frozen=True)
class DesiredSoftware:
    """The desired ``software`` entry of the shadow, validated (see docs/agent.md)."""

    version: str
    url: str
    job_id: str
    sha256: str | None = None
    size: int | None = None
    auth: str | None = None

    @property
    def source(self) -> Source:
        return Source(self.url, auth=self.auth)

    @classmethod
    def parse(cls, entry: Any, *, store_url: str | None = None) -> DesiredSoftware:
        """Validate a desired entry; DesiredStateInvalid names the first bad field."""
        if not isinstance(entry, Mapping):
            raise DesiredStateInvalid("desired: software must be an object")

        def text(name: str, *, limit: int = 256) -> str:
            value = entry.get(name)
            if not isinstance(value, str) or not value or len(value) > limit:
                raise DesiredStateInvalid(
                    f"desired: software.{name} must be a non-empty string of at most {limit}",
                    field=name,
                )
            return value

        job_id = text("jobId", limit=_JOB_ID_MAX)
        if not valid_job_id(job_id):
            raise DesiredStateInvalid(
                "desired: software.jobId must be visible ASCII characters (no spaces or "
                "control characters)",
                field="jobId",
            )
        version = text("version", limit=64)
        url = text("url", limit=4096)
        auth = entry.get("auth")
        if auth not in (None, "token", "presigned"):
            raise DesiredStateInvalid("desired: software.auth must be 'token' or absent")
        auth = "token" if auth == "token" else None
        if url.startswith("/"):
            if auth != "token" or store_url is None:
                raise DesiredStateInvalid(
                    "desired: a relative software.url needs auth 'token' and store.url configured"
                )
            url = store_url + url
        sha = entry.get("sha256")
        if sha is not None and not (
            isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)
        ):
            raise DesiredStateInvalid("desired: software.sha256 must be 64 lowercase hex digits")
        size = entry.get("size")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise DesiredStateInvalid("desired: software.size must be a positive integer")
        desired = cls(version=version, url=url, job_id=job_id, sha256=sha, size=size, auth=auth)
        desired.source  # noqa: B018 - raises InsecureUrl for anything but https
        return desired


# --- small durable state of the device ----------------------------------------------------------


@dataclass
class DeviceState:
    """What the device knows beyond the job: the version in each slot, the security floor."""

    path: Path
    versions: dict[str, str]
    security_version: int = 0
    # the latest jobIds this device started, oldest first: a jobId runs at most once, also
    # when the desired state names an older job again after another one ran
    jobs: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, state_dir: Path) -> DeviceState:
        path = state_dir / DEVICE_STATE
        try:
            doc = json.loads(path.read_bytes())
        except FileNotFoundError:
            return cls(path, {})
        except (OSError, ValueError) as exc:
            log.warning("device_state_unreadable", path=str(path), error=str(exc))
            return cls(path, {})
        versions = doc.get("versions") if isinstance(doc, dict) else None
        floor = doc.get("securityVersion") if isinstance(doc, dict) else None
        jobs = doc.get("jobs") if isinstance(doc, dict) else None
        return cls(
            path,
            {k: v for k, v in (versions or {}).items() if isinstance(v, str)},
            floor if isinstance(floor, int) and not isinstance(floor, bool) else 0,
            [j for j in jobs if isinstance(j, str)][-_JOBS_KEPT:] if isinstance(jobs, list) else [],
        )

    def started(self, job_id: str) -> None:
        """Remember ``job_id`` (call :meth:`save` after)."""
        if job_id not in self.jobs:
            self.jobs = [*self.jobs, job_id][-_JOBS_KEPT:]

    def save(self) -> None:
        doc = {
            "versions": self.versions,
            "securityVersion": self.security_version,
            "jobs": self.jobs,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        replace_file(self.path, json.dumps(doc, sort_keys=True).encode() + b"\n")


def read_version_file(path: Path | None) -> str | None:
    """The running rootfs's own version: ``VERSION_ID=`` of an os-release file, or the first
    line of a plain version file; None when not configured or not readable."""
    if path is None:
        return None
    try:
        text = path.read_text()
    except OSError as exc:
        log.warning("version_file_unreadable", path=str(path), error=exc.strerror)
        return None
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == "VERSION_ID":
            return value.strip().strip('"').strip("'") or None
    first = text.strip().splitlines()[0].strip() if text.strip() else ""
    return first if first and "=" not in first else None


# --- collaborators -------------------------------------------------------------------------------


class Reporter(Protocol):
    def report(self, reported: Mapping[str, Any], *, client_token: str | None = None) -> int: ...

    async def flush(self, within: float) -> bool: ...


@dataclass(frozen=True)
class HealthResult:
    ok: bool
    reason: str = ""


HealthCheck = Callable[[], Awaitable[HealthResult]]
Rebooter = Callable[[], Awaitable[None] | None]


# --- the runner ----------------------------------------------------------------------------------


@dataclass
class Progress:
    phase: str = "idle"
    percent: int = 0
    job_id: str | None = None
    updated: float = 0.0


class RebootPending(Exception):
    """Internal: the runner asked for a reboot; nothing more happens in this boot."""


@dataclass(frozen=True)
class _Resume:
    """A kept download checkpoint: payload and image offsets of a frame end, the entity's
    ETag and the bundle preamble to verify again."""

    payload: int
    image: int
    etag: str
    preamble: bytes
    preamble_sha256: str


class UpdateRunner:
    """Runs jobs and the post-reboot steps for one device (one instance per Agent).

    ``keyring`` is the trusted keys, or the error that kept them from loading: the runner still
    recovers and reports, but starts no job, and fails the health check of a freshly booted
    slot (an image that cannot verify the next update must not be committed). With
    ``keyring_path`` every new job loads the keyring again, so a fixed or rotated keyring
    takes effect without a restart.
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        bootloader: Bootloader,
        journal: Journal,
        booted_slot: str,
        layout: SlotLayout,
        downloader: Downloader,
        reporter: Reporter,
        rebooter: Rebooter,
        health: HealthCheck,
        keyring: Keyring | KeyringError,
        keyring_path: Path | None = None,
        notifier: Notifier | None = None,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.config = config
        self.bootloader = bootloader
        self.journal = journal
        self.booted = booted_slot
        self.layout = layout
        self.target = other_slot(booted_slot)
        self.downloader = downloader
        self.reporter = reporter
        self.rebooter = rebooter
        self.health = health
        self.keyring = keyring
        self.keyring_path = keyring_path
        self.notifier = notifier or Notifier("")
        self.now = now
        self.crash = CrashPoints(config.testing.crash_points, config.testing.exit_code)
        self.device = DeviceState.load(config.state_dir)
        self._file_version = read_version_file(config.version_file)
        self.progress = Progress()
        self.heartbeat = time.monotonic()
        self.cancellable = False
        # called each time a job becomes cancellable (the agent acts on a deferred replacement)
        self.on_cancellable: Callable[[], object] = lambda: None
        # set by the agent before it cancels a job because it stops (not because it was replaced)
        self.stopping = False
        # the journal found unreadable at start and set aside (reported with the idle state)
        self.journal_error: JournalCorrupt | None = None
        # set when a rollback cannot reboot off the failed target (see reboot_failed)
        self.stuck: RebootFailed | None = None
        self.record: JobRecord | None = None
        self._fresh_url: asyncio.Queue[DesiredSoftware] = asyncio.Queue()
        self._last_progress_report = 0.0
        self._checkpoint: tuple[int, int] | None = None  # journaled for the download in flight
        self._saved_preamble: tuple[bytes, str] | None = None  # kept preamble, its SHA-256

    # --- facts ---------------------------------------------------------------------------------

    @property
    def running_version(self) -> str:
        if self._file_version is not None:
            return self._file_version
        record = self.record
        if record is not None and record.state in _ON_TARGET and self.booted == record.target_slot:
            # the trial boot of the job's image: device.json names a slot's version only once
            # it is committed, so it still holds what the slot had before this job
            return str(record.runtime.get("manifest_version") or record.version)
        return self.device.versions.get(self.booted, "unknown")

    def software_report(
        self,
        state: str,
        *,
        job_id: str | None = None,
        progress: int | None = None,
        error: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        return {
            "software": {
                "version": self.running_version,
                "slot": self.booted,
                "state": state,
                "jobId": job_id,
                "progress": progress,
                "error": dict(error) if error else None,
                "securityVersion": self.device.security_version,
            }
        }

    def report_state(self, state: str, *, client_token: str | None = None, **fields: Any) -> int:
        """Update the reported software entry (and the systemd STATUS= line)."""
        self.progress = Progress(
            state, fields.get("progress") or 0, fields.get("job_id"), time.monotonic()
        )
        self.notifier.status(_status_line(state, fields.get("progress"), fields.get("job_id")))
        return self.reporter.report(
            self.software_report(state, **fields), client_token=client_token
        )

    def beat(self) -> None:
        self.heartbeat = time.monotonic()

    # --- persistence helpers (blocking I/O goes to threads) ------------------------------------

    async def _advance(self, record: JobRecord, event: Event, **changes: Any) -> JobRecord:
        record = await settled(self.journal.advance, record, event, **changes)
        self.record = record
        self.beat()
        self.crash.hit(f"journaled:{record.state.value}")
        return record

    async def _bl(self, op: str, slot: str) -> None:
        await settled(getattr(self.bootloader, op), slot)
        self.beat()

    async def _final_report(self, record: JobRecord) -> JobRecord:
        """Report a final state, and once accepted store ``reported`` in the journal.

        The report's clientToken is derived from the device, the job and the final state, so
        every send of it (a retry, or a restart after a crash before the journal said
        ``reported``) is the same update to the replica, which applies it once."""
        state = self._report_final_state(record)
        if await self.reporter.flush(_FINAL_REPORT_WAIT):
            self.crash.hit(f"reported:{state}")
            record = await settled(self.journal.update, record, reported=True)
            self.record = record
        return record

    def _report_final_state(self, record: JobRecord) -> str:
        """Queue the final report of ``record``'s job (its own clientToken); the state sent."""
        state = reported_state(record.state)
        self.report_state(
            state,
            client_token=final_report_token(self.config.device_id, record.job_id, state),
            job_id=record.job_id,
            progress=100 if record.state == State.SUCCEEDED else None,
            error=record.error,
        )
        return state

    # --- recovery --------------------------------------------------------------------------------

    async def recover(self) -> RecoveryAction:
        """Apply the start-up decision's bootloader marks and journal event; returns it.

        The action's step runs later in :meth:`resume` (it may need the broker)."""
        corrupt: JournalCorrupt | None = None
        try:
            record = await settled(self.journal.load)
        except JournalCorrupt as exc:
            record, corrupt = None, exc
        self.record = record
        try:
            boot_state = await settled(self.bootloader.state)
        except BootloaderEnvCorrupt as exc:
            # No valid env copy: the firmware rescue-booted this slot. Make it the good, first
            # slot and the other one bad, then decide as usual (the job, if any, is judged on
            # that state: the other slot is not trusted any more).
            log.error("bootloader_env_repaired", booted=self.booted, reason=exc.message)
            await settled(self.bootloader.repair, self.booted)
            boot_state = await settled(self.bootloader.state)
        if corrupt is not None:
            boot_state, record = await self._set_journal_aside(corrupt, boot_state)
            self.record = record
        rebooted = record is not None and self.journal.rebooted(record)
        action = decide_recovery(record, self.booted, boot_state, rebooted)
        log.info(
            "recovery_decided",
            step=action.step.value,
            journal_event=action.event.value if action.event else None,
            mark_bad=action.mark_bad,
            confirm=action.confirm,
            reason=action.reason,
            job_id=record.job_id if record else None,
            booted=self.booted,
            rebooted=rebooted,
        )
        if action.mark_bad is not None:
            await self._bl("mark_bad", action.mark_bad)
        if action.event is not None and record is not None:
            changes: dict[str, Any] = {}
            if action.error is not None:
                changes["error"] = action.error
            self.record = await self._advance(record, action.event, **changes)
        if action.confirm is not None:
            await self._bl("mark_good", action.confirm)
        return action

    async def _set_journal_aside(
        self, corrupt: JournalCorrupt, boot: BootState
    ) -> tuple[BootState, JobRecord | None]:
        """An unreadable journal (a torn write, a newer agent's schema after a rollback): its
        job is lost. The file is kept aside for diagnosis either way.

        On a committed slot the device is sound without it: make the other slot bad (whatever
        a job left there is unknown; the next job rewrites it), report the problem and go on
        with no job. On a slot on trial there is no telling whether it passed its health
        check, so it is never confirmed: the device goes back to the other, good slot. A
        stand-in record of the last job started, in ``rolling_back``, drives the usual
        rollback (mark bad, reboot, report ``rolled_back`` with the reason). With no good slot
        to go back to, the agent refuses to start and changes nothing.

        Returns the boot state and the record to recover with (None: no job)."""
        other = other_slot(self.booted)
        on_trial = not boot.slot(self.booted).good
        if on_trial and not boot.slot(other).good:
            raise corrupt
        log.error("journal_corrupt", reason=corrupt.message, booted=self.booted, on_trial=on_trial)
        await settled(self.journal.quarantine)
        if on_trial:
            stand_in = self._stand_in_rollback(corrupt, other)
            return boot, await settled(self.journal.store, stand_in)
        if not boot.slot(other).bad:
            await self._bl("mark_bad", other)
            boot = await settled(self.bootloader.state)
        self.journal_error = corrupt
        return boot, None

    def _stand_in_rollback(self, corrupt: JournalCorrupt, fallback: str) -> JobRecord:
        """The job that put the booted slot on trial, as far as the device still knows it:
        the last jobId it started (device.json), rolling back with the journal's error."""
        error = JournalCorrupt(
            f"{corrupt.message}; slot {self.booted} ran on trial and cannot be confirmed "
            f"without its job: rolled back to slot {fallback}"
        )
        now = time.time()
        return JobRecord(
            job_id=self.device.jobs[-1] if self.device.jobs else "unknown",
            state=State.ROLLING_BACK,
            target_slot=self.booted,
            version="",
            boot_id=self.journal.boot_id,
            transitions=1,
            last_event=Event.HEALTH_FAILED.value,
            error=error.to_wire(),
            created=now,
            updated=now,
        )

    async def resume(self, action: RecoveryAction) -> None:
        """Run the step the recovery decided (may reboot: then RebootPending is raised)."""
        record = self.record
        step = action.step
        if record is None or step == Step.NONE:
            if record is not None and record.final:
                # nothing to do, but say the truth about the last job again: as the same update
                # as its final report, which the replica does not apply twice
                self._report_final_state(record)
            elif self.journal_error is not None:
                self.report_state("idle", error=self.journal_error.to_wire())
            else:
                self.report_state("idle")
            return
        if step in (Step.REPORT, Step.FINISH):
            await self._final_report(record)
        elif step == Step.VERIFY:
            await self._verify(record)
        elif step == Step.COMMIT:
            await self._commit(record)
        elif step == Step.ROLLBACK:
            await self._rollback(record)
        elif step == Step.SWITCH_AND_REBOOT:
            await self._switch_and_reboot(record)
        elif step == Step.REVERIFY_SLOT:
            await self._reverify(record)
        elif step == Step.RESUME_DOWNLOAD:
            await self._download_and_install(record, self.desired_from(record))

    @staticmethod
    def desired_from(record: JobRecord) -> DesiredSoftware:
        """The desired entry a journaled job was started from."""
        runtime = record.runtime
        return DesiredSoftware(
            version=record.version,
            url=record.bundle_url,
            job_id=record.job_id,
            sha256=runtime.get("sha256"),
            size=runtime.get("size"),
            auth=runtime.get("auth"),
        )

    # --- a job -------------------------------------------------------------------------------

    def offer_url(self, desired: DesiredSoftware) -> None:
        """A fresh URL for the running job (after download_url_expired)."""
        self._fresh_url.put_nowait(desired)

    def trusted_keys(self) -> Keyring:
        """The keyring bundles are verified against; KeyringError if it could not be loaded."""
        if isinstance(self.keyring, KeyringError):
            # a fresh error: raising the stored one would chain every raise's frames onto it
            raise KeyringError(self.keyring.message)
        return self.keyring

    async def _reload_keyring(self) -> None:
        """Load the keyring again (with ``keyring_path``): a fixed or rotated one counts now."""
        if self.keyring_path is not None:
            self.keyring = await load_keyring(self.keyring_path)

    async def run_job(self, desired: DesiredSoftware) -> None:
        """Install ``desired``; returns after a failure, raises RebootPending after the switch.

        Raises an OtadError before anything is journaled or marked when the job cannot start
        (no usable keyring, the journal refuses it)."""
        await self._reload_keyring()
        self.trusted_keys()
        log.info("job_started", job_id=desired.job_id, version=desired.version)
        record = await settled(
            self.journal.begin,
            desired.job_id,
            target_slot=self.target,
            version=desired.version,
            bundle_url=desired.url,
            from_version=self.running_version,
            runtime={"sha256": desired.sha256, "size": desired.size, "auth": desired.auth},
        )
        self.record = record
        self.crash.hit("journaled:downloading")
        self.device.started(desired.job_id)
        await settled(self.device.save)
        await self._download_and_install(record, desired)

    async def fail_invalid(self, job_id: str | None, error: OtadError) -> None:
        """A desired entry we cannot act on: report ``failed``; the device is not touched."""
        log.warning("desired_rejected", job_id=job_id, error=error.code, reason=error.message)
        self.report_state("failed", job_id=job_id, error=error.to_wire())
        await self.reporter.flush(_FINAL_REPORT_WAIT)

    async def _download_and_install(self, record: JobRecord, desired: DesiredSoftware) -> None:
        self.cancellable = True
        self.on_cancellable()
        writer: SlotWriter | None = None
        try:
            self.trusted_keys()  # a download resumed at start: fail it before touching the slot
            await self._bl("mark_bad", self.target)
            self.report_state("downloading", job_id=record.job_id, progress=0)
            manifest, writer = await self._stream(record, desired)
            self.cancellable = False
            record = self.record or record
            record = await self._advance(
                record,
                Event.PAYLOAD_VERIFIED,
                runtime={
                    **{k: v for k, v in record.runtime.items() if k != "resume"},
                    "image_sha256": manifest.image_sha256,
                    "image_size": manifest.image_size,
                    "security_version": manifest.security_version,
                    "manifest_version": manifest.version,
                },
            )
            await self._verify_slot(record, writer)
        except asyncio.CancelledError:
            if self.stopping:
                # The agent stops (restart, shutdown, agent upgrade), nobody superseded the job:
                # the journal keeps its step and start-up recovery resumes it.
                log.info("job_interrupted", job_id=record.job_id, reason="agent stopping")
                raise
            await self._end_failed(JobCancelled("job: cancelled by a new desired state"))
            raise
        except Exception as exc:  # the top of a job: every error becomes a reported failure
            await self._end_failed(classify(exc))
            return
        finally:
            self.cancellable = False
            if writer is not None:
                await settled(writer.close)
        await self._switch_and_reboot(self.record or record)

    async def _end_failed(self, error: OtadError) -> None:
        record = self.record
        if record is None or record.final:
            return
        log.warning("job_failed", job_id=record.job_id, error=error.code, reason=error.message)
        event = Event.CANCELLED if isinstance(error, JobCancelled) else Event.FAILED
        # Journaled whole even if the job is cancelled meanwhile (a new desired state): the
        # next job's begin() must find this one ended, not still in flight.
        advance = asyncio.ensure_future(self._advance(record, event, error=error.to_wire()))
        cancelled = await outlast(advance)
        record = advance.result()
        if isinstance(error, JobCancelled) or cancelled:
            # The next job reports right after; do not hold the cancellation up on the broker.
            self.report_state("failed", job_id=record.job_id, error=record.error)
            if cancelled:
                raise asyncio.CancelledError
            return
        await self._final_report(record)

    def _policy(self, capacity: int) -> VerifyPolicy:
        return VerifyPolicy(
            compatible=self.config.compatible,
            min_security_version=self.device.security_version,
            device_id=self.config.device_id,
            now=self.now(),
            max_image_size=capacity,
        )

    def _open_writer(self, offset: int = 0) -> SlotWriter:
        # finish() re-reads the slot and compares it with the manifest's image hash: a running
        # hash of the writes would only check the same bytes before they reached the medium.
        return open_target(
            self.layout,
            self.booted,
            hash_writes=False,
            offset=offset,
            read_back_step=self.config.download.read_back_step,
            on_progress=self.beat,
        )

    async def _stream(
        self, record: JobRecord, desired: DesiredSoftware
    ) -> tuple[Manifest, SlotWriter]:
        """Download, verify and write the bundle into the target; the writer is left open."""
        self._checkpoint = self._saved_preamble = None
        resume = None if desired.url.startswith("file://") else await self._resume_point(record)
        if resume is not None:
            self._checkpoint = (resume.payload, resume.image)
            self._saved_preamble = (resume.preamble, resume.preamble_sha256)
        first = await settled(
            self._open_writer, resume.image if resume else 0, undo=SlotWriter.close
        )
        try:
            pipe, transfer = self._make_pipe(desired, first, resume)
        except BaseException:
            # nothing owns the open slot yet (on a block device an O_EXCL open: left open, it
            # would refuse every later job)
            await settled(first.close)
            raise
        try:
            if resume is not None and isinstance(transfer, Transfer):
                # the kept preamble is verified again (keys, policy, expiry as of now), then the
                # payload continues at the checkpoint, with If-Range on the entity it came from
                await pipe.put(resume.preamble)
                transfer.offset = len(resume.preamble) + resume.payload
                transfer.etag = resume.etag
                log.info(
                    "download_resumed_after_restart",
                    job_id=record.job_id,
                    offset=transfer.offset,
                    image_offset=resume.image,
                )
            manifest = await self._pump(record, desired, transfer, pipe)
        except BaseException:
            await pipe.abort()
            raise
        writer = pipe.writer
        if writer is None:  # an empty image: nothing was written, still verify the slot
            writer = await settled(self._open_writer, undo=SlotWriter.close)
        return manifest, writer

    def _make_pipe(
        self,
        desired: DesiredSoftware,
        first: SlotWriter,
        resume: _Resume | None,
    ) -> tuple[DiskPipe, Transfer | FileTransfer]:
        """The transfer for ``desired`` and the disk pipe that writes it through ``first``."""
        capacity = first.capacity
        transfer: Transfer | FileTransfer
        if desired.url.startswith("file://"):
            transfer = FileTransfer(Path(desired.url[len("file://") :]), self.config.download)
        else:
            transfer = self.downloader.transfer(
                desired.source, max_size=desired.size, alive=self.beat
            )

        def make_verifier(resume_from: tuple[int, int] | None = None) -> StreamVerifier:
            # the image hash is checked where it matters, on the medium: _check_slot re-reads
            # the slot after fsync against the signed manifest.image_sha256 before anything can
            # boot it; hashing the decompressor's output too costs ~0.8 CPU-s/GiB for nothing
            return StreamVerifier(
                self.trusted_keys(),
                self._policy(capacity),
                hash_image=False,
                resume_from=resume_from,
            )

        pipe = DiskPipe(
            make_verifier,
            self._open_writer,
            first,
            self.config.download.queue_chunks,
            self.crash,
            lambda manifest: self._check_manifest(manifest, desired),
            verifier=make_verifier((resume.payload, resume.image)) if resume else None,
            written=resume.image if resume else 0,
        )
        return pipe, transfer

    async def _pump(
        self,
        record: JobRecord,
        desired: DesiredSoftware,
        transfer: Transfer | FileTransfer,
        pipe: DiskPipe,
    ) -> Manifest:
        expected = transfer.offset
        limited = False
        # Network reads come in pieces of up to ~256 KiB; the disk thread gets blocks of
        # `block` bytes, so there are few hand-offs (each one is a GIL and scheduler round trip
        # between threads, which a loaded 2-core device pays dearly for).
        block = self.config.download.block_size
        pending: list[bytes] = []
        pending_len = 0

        async def flush() -> None:
            nonlocal pending, pending_len
            if pending:
                data = pending[0] if len(pending) == 1 else b"".join(pending)
                pending, pending_len = [], 0
                await pipe.put(data)

        while True:
            try:
                async for offset, data in transfer.chunks():
                    if offset != expected:
                        # the server sent the entity again from byte 0: start verifier and slot over
                        pending, pending_len = [], 0
                        await self._forget_checkpoint()
                        pipe.reset()
                        limited = False
                    pending.append(data)
                    pending_len += len(data)
                    expected = offset + len(data)
                    if pending_len >= block:
                        await flush()
                    self.beat()
                    # after a reset, the verifier and checkpoint are the old entity's until the
                    # disk thread reaches it: neither its size nor its resume point are ours
                    if not limited and pipe.current and pipe.verifier.total_size is not None:
                        transfer.limit(pipe.verifier.total_size)
                        limited = True
                    self._maybe_progress(record, transfer)
                    if (
                        isinstance(transfer, Transfer)
                        and pipe.current
                        and pipe.checkpoint != self._checkpoint
                    ):
                        await self._store_checkpoint(transfer, pipe)
                await flush()
                break
            except UrlExpired as exc:
                await flush()
                desired = await self._wait_for_fresh_url(record, desired, exc)
                transfer.replace_source(desired.source)
        manifest = await pipe.finish()
        self.crash.hit("written")
        log.info(
            "bundle_verified",
            job_id=record.job_id,
            version=manifest.version,
            bytes=transfer.bytes_received,
            resumes=transfer.resumes,
            restarts=transfer.restarts,
        )
        return manifest

    async def _resume_point(self, record: JobRecord) -> _Resume | None:
        """Where this job's download can continue after a restart, if a checkpoint was kept."""
        entry = record.runtime.get("resume")
        if not isinstance(entry, dict):
            return None
        payload, image = entry.get("payload"), entry.get("image")
        etag, sha256 = entry.get("etag"), entry.get("preamble_sha256")
        if not (
            isinstance(payload, int)
            and isinstance(image, int)
            and payload >= 0
            and image >= 0
            and isinstance(etag, str)
            and etag
            and isinstance(sha256, str)
        ):
            log.warning("download_checkpoint_ignored", job_id=record.job_id, reason="malformed")
            return None
        preamble = await settled(self.journal.load_preamble, sha256)
        if preamble is None:
            log.warning("download_checkpoint_ignored", job_id=record.job_id, reason="no preamble")
            return None
        # Offsets beyond the bundle the preamble describes would fail the job as a bad bundle;
        # a checkpoint that does not fit is only a lost shortcut: start over instead.
        try:
            manifest = parse_preamble(preamble).manifest()
        except BundleError:
            manifest = None
        if manifest is None or payload > manifest.size or image > manifest.image_size:
            log.warning("download_checkpoint_ignored", job_id=record.job_id, reason="not in bundle")
            return None
        return _Resume(payload, image, etag, preamble, sha256)

    async def _store_checkpoint(self, transfer: Transfer, pipe: DiskPipe) -> None:
        """Journal where a restarted agent can resume this download (``DiskPipe.checkpoint``).

        Only for an entity with an ETag: nothing else proves that a later request returns the
        same bytes (with it, ``If-Range`` does)."""
        point, preamble, record = pipe.checkpoint, pipe.verifier.preamble, self.record
        if point is None or preamble is None or record is None or not transfer.etag:
            return
        self._checkpoint = point
        if self._saved_preamble is None or preamble != self._saved_preamble[0]:
            sha256 = await settled(self.journal.save_preamble, preamble)
            self._saved_preamble = (preamble, sha256)
        resume = {
            "payload": point[0],
            "image": point[1],
            "etag": transfer.etag,
            "preamble_sha256": self._saved_preamble[1],
        }
        self.record = await settled(
            self.journal.update, record, runtime={**record.runtime, "resume": resume}
        )

    async def _forget_checkpoint(self) -> None:
        """Before the first byte of another entity reaches the slot: a restart must not resume
        the old one on top of it."""
        self._checkpoint = None
        record = self.record
        if record is not None and "resume" in record.runtime:
            runtime = {k: v for k, v in record.runtime.items() if k != "resume"}
            self.record = await settled(self.journal.update, record, runtime=runtime)

    @staticmethod
    def _check_manifest(manifest: Manifest, desired: DesiredSoftware) -> None:
        """The signed manifest must be the one the desired state asked for."""
        if desired.version and manifest.version != desired.version:
            raise DesiredStateInvalid(
                f"job: desired version {desired.version!r} but the bundle is {manifest.version!r}"
            )
        if desired.sha256 is not None and desired.sha256 != manifest.image_sha256:
            raise DesiredStateInvalid("job: the bundle's image sha256 differs from the desired one")

    async def _wait_for_fresh_url(
        self, record: JobRecord, desired: DesiredSoftware, exc: UrlExpired
    ) -> DesiredSoftware:
        """Report the expired URL and wait until the desired state carries a different one.

        Raises ``exc`` (the job fails as ``download_url_expired``) when no fresh URL came within
        ``download.url_refresh_timeout``."""
        log.warning("download_url_expired", job_id=record.job_id, url=redact_url(desired.url))
        self.report_state(
            "downloading",
            job_id=record.job_id,
            progress=self.progress.percent,
            error=exc.to_wire(),
        )
        deadline = time.monotonic() + self.config.download.url_refresh_timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                async with asyncio.timeout(min(30.0, left)):
                    fresh = await self._fresh_url.get()
            except TimeoutError:
                self.beat()  # waiting for the cloud is not a hang: keep the watchdog fed
                continue
            self.beat()
            if fresh.job_id == record.job_id and fresh.url != desired.url:
                log.info("download_url_refreshed", job_id=record.job_id)
                self.record = record = await settled(
                    self.journal.update, self.record or record, bundle_url=fresh.url
                )
                self.report_state(
                    "downloading", job_id=record.job_id, progress=self.progress.percent
                )
                return fresh
        log.error(
            "download_url_not_refreshed",
            job_id=record.job_id,
            waited=self.config.download.url_refresh_timeout,
        )
        raise exc

    def _maybe_progress(self, record: JobRecord, transfer: Transfer | FileTransfer) -> None:
        total = transfer.total
        if not total:
            return
        percent = min(99, transfer.offset * 100 // total)
        now = time.monotonic()
        if now - self._last_progress_report >= self.config.progress_interval:
            self._last_progress_report = now
            self.report_state("downloading", job_id=record.job_id, progress=percent)

    async def _verify_slot(self, record: JobRecord, writer: SlotWriter | None = None) -> None:
        """fsync, re-read and hash the written slot; journal ``rebooting`` when it matches."""
        self.report_state("installing", job_id=record.job_id, progress=100)
        sha = record.runtime.get("image_sha256")
        size = record.runtime.get("image_size")
        if not isinstance(sha, str) or not isinstance(size, int):
            raise SlotVerifyFailed("job: journal lacks the image hash to verify the slot")
        await settled(self._check_slot, writer, sha, size)
        self.crash.hit("verified")
        await self._advance(record, Event.SLOT_VERIFIED)

    def _check_slot(self, writer: SlotWriter | None, sha: str, size: int) -> None:
        if writer is None:
            # after a restart: hash what the medium holds, in one read (finish re-reads it; a
            # running hash would read it all once more at open)
            with SlotWriter(
                self.layout.path(self.target),
                booted=self.layout.path(self.booted),
                offset=size,
                slot=self.target,
                hash_writes=False,
                on_progress=self.beat,
            ) as again:
                again.finish(sha)
            return
        if writer.offset != size:
            raise SlotVerifyFailed(
                f"job: wrote {writer.offset} bytes, the manifest declares {size}"
            )
        writer.finish(sha)

    async def _reverify(self, record: JobRecord) -> None:
        try:
            await self._verify_slot(record)
        except Exception as exc:
            await self._end_failed(classify(exc))
            return
        await self._switch_and_reboot(self.record or record)

    async def _switch_and_reboot(self, record: JobRecord) -> None:
        try:
            await self._bl("try_once", record.target_slot)
            self.crash.hit("switched")
            record = await self._advance(record, Event.REBOOT_REQUESTED)
        except Exception as exc:
            error = classify(exc)
            log.error(
                "slot_switch_failed",
                job_id=record.job_id,
                slot=record.target_slot,
                error=error.code,
            )
            await self._take_switch_back(record, error)
            return
        self.report_state("rebooting", job_id=record.job_id, progress=100)
        await self.reporter.flush(_FINAL_REPORT_WAIT)
        await self._reboot()

    async def _take_switch_back(self, record: JobRecord, error: OtadError) -> None:
        """No reboot into the target (the switch raised, or the reboot failed). The env may hold
        the target (half-)switched, so mark it bad again before the job ends as failed on the
        old slot."""
        try:
            await self._bl("mark_bad", record.target_slot)
        except Exception as again:
            # nothing more to do here: recovery on the next start judges the slot that boots
            log.error("slot_mark_bad_failed", slot=record.target_slot, error=classify(again).code)
        await self._end_failed(error)

    async def _reboot(self) -> None:
        """Run the rebooter; raises RebootPending once it succeeded (the power goes next)."""
        log.info("reboot_requested", booted=self.booted)
        self.notifier.status("rebooting")
        try:
            result = self.rebooter()
            if inspect.isawaitable(result):
                await result
        except Exception as exc:
            await self.reboot_failed(exc)
            return
        raise RebootPending()

    async def reboot_failed(self, cause: BaseException) -> None:
        """The reboot did not happen: the command failed, or the system stayed up too long.

        Into the target (``rebooting``): the switch is taken back (target marked bad) and the
        job ends ``failed`` / ``reboot_failed`` on the old slot. Out of a target that failed
        its health check (``rolling_back``): only a reboot gets off it, so the error is reported
        and :attr:`stuck` set (the daemon stops feeding the watchdog, systemd restarts the
        agent, and recovery tries the rollback's reboot again).
        """
        error = cause if isinstance(cause, RebootFailed) else RebootFailed(f"reboot: {cause}")
        record = self.record
        if record is None or record.final:
            return
        log.error(
            "reboot_failed", job_id=record.job_id, state=record.state.value, reason=error.message
        )
        if record.state == State.REBOOTING:
            await self._take_switch_back(record, error)
            return
        self.stuck = error
        self.report_state("verifying", job_id=record.job_id, error=error.to_wire())
        self.notifier.status(f"stuck: {error.message}")

    # --- after the reboot ----------------------------------------------------------------------

    async def _verify(self, record: JobRecord) -> None:
        self.report_state("verifying", job_id=record.job_id, progress=100)
        await self._reload_keyring()  # a read error at start must not cost the update
        if isinstance(self.keyring, KeyringError):
            # committing an image that cannot verify bundles would leave no way to update it
            result = HealthResult(
                False, f"this image cannot verify updates: {self.keyring.message}"
            )
        else:
            try:
                result = await self.health()
            except Exception as exc:  # a crashing check is a failed check, never a pass
                log.exception("health_check_crashed", job_id=record.job_id)
                result = HealthResult(False, f"the health check itself failed: {exc}")
        self.beat()
        if result.ok:
            await self._commit(record)
            return
        error = HealthCheckFailed(f"health: {result.reason}")
        log.warning("health_check_failed", job_id=record.job_id, reason=result.reason)
        record = await self._advance(record, Event.HEALTH_FAILED, error=error.to_wire())
        await self._rollback(record)

    async def _commit(self, record: JobRecord) -> None:
        await self._bl("mark_good", record.target_slot)
        self.crash.hit("committed")
        floor = record.runtime.get("security_version")
        version = record.runtime.get("manifest_version") or record.version
        self.device.versions[record.target_slot] = str(version)
        if isinstance(floor, int) and floor > self.device.security_version:
            self.device.security_version = floor
        await settled(self.device.save)
        if record.state != State.SUCCEEDED:
            record = await self._advance(record, Event.HEALTH_PASSED)
        log.info("job_succeeded", job_id=record.job_id, version=version)
        await self._final_report(record)

    async def _rollback(self, record: JobRecord) -> None:
        await self._bl("mark_bad", record.target_slot)
        self.crash.hit("rollback_marked")
        record = await self._advance(record, Event.REBOOT_REQUESTED)
        self.report_state("verifying", job_id=record.job_id, error=record.error)
        await self.reporter.flush(_FINAL_REPORT_WAIT)
        await self._reboot()


async def load_keyring(path: Path) -> Keyring | KeyringError:
    """The keyring at ``path`` (loaded in a thread), or the error that names why it does not
    load: a runner keeps that error and fails jobs with it instead of stopping."""
    try:
        return await settled(Keyring.load, path)
    except KeyringError as exc:
        return exc


def final_report_token(device_id: str, job_id: str, state: str) -> str:
    """The clientToken of a job's final report: the same in every process (at most 64 bytes)."""
    digest = hashlib.sha256(f"{device_id}\0{job_id}\0{state}".encode()).hexdigest()
    return f"final-{digest[:40]}"


def _status_line(state: str, progress: int | None, job_id: str | None) -> str:
    line = state
    if job_id:
        line += f" job {job_id}"
    if progress is not None and state in ("downloading", "installing"):
        line += f" {progress}%"
    return line


def classify(error: BaseException) -> OtadError:
    """The error a job reports for any exception that reached its top."""
    if isinstance(error, OtadError):
        return error
    if isinstance(error, OSError):
        return OtadError(f"job: {error.strerror or error}")
    return OtadError(f"job: unexpected {type(error).__name__}")
