"""What an operator sees of a rollout: a JSON summary and a rich table (no I/O here).

The same summary feeds ``otad fleet status --json``, the live table of ``--watch`` and the demo,
so what a script reads and what a person reads never disagree.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from rich.console import Group
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from otad.cloud.rollout_plan import (
    DONE,
    FAILURES,
    IN_FLIGHT,
    DeviceRecord,
    DeviceSeen,
    DeviceState,
    Rollout,
    RolloutState,
    format_duration,
    tally,
)

__layer__ = "pure"

_STATE_STYLE = {
    RolloutState.RUNNING: "bold cyan",
    RolloutState.PAUSED: "bold yellow",
    RolloutState.COMPLETED: "bold green",
    RolloutState.ABORTED: "bold red",
}
# Column order of the per-state counts: the way a device moves through a rollout.
_COUNT_COLUMNS: tuple[tuple[str, frozenset[DeviceState], str], ...] = (
    ("wait", frozenset({DeviceState.PENDING}), "dim"),
    ("busy", IN_FLIGHT, "cyan"),
    ("updated", frozenset({DeviceState.SUCCEEDED}), "green"),
    ("back", frozenset({DeviceState.ROLLED_BACK}), "yellow"),
    ("failed", frozenset({DeviceState.FAILED, DeviceState.TIMED_OUT}), "red"),
    ("skipped", frozenset({DeviceState.SKIPPED, DeviceState.CANCELLED}), "dim"),
)


def summarize(rollout: Rollout, devices: Mapping[str, DeviceRecord], now: float) -> dict[str, Any]:
    """The rollout as plain data (``status --json``)."""
    records = sorted(devices.values(), key=lambda d: d.position)
    counts = Counter(d.state.value for d in records)
    waves = []
    for index, target in enumerate(rollout.waves):
        t = tally(rollout, records, index)
        waves.append(
            {
                "wave": index + 1,
                "target": target,
                "size": t.size,
                "done": t.done,
                "succeeded": t.succeeded,
                "failed": t.failed,
                "failure_rate": round(t.failure_rate, 4),
                "started": index <= rollout.current_wave,
                "accepted": index in rollout.accepted_waves,
            }
        )
    end = rollout.finished_at if rollout.finished_at is not None else now
    return {
        "id": rollout.id,
        "artifact": rollout.artifact_id,
        "version": rollout.version,
        "state": rollout.state.value,
        "reason": rollout.reason,
        "devices": len(records),
        "counts": dict(sorted(counts.items())),
        "current_wave": rollout.current_wave + 1,
        "waves": waves,
        "max_failure_rate": rollout.max_failure_rate,
        "wave_timeout": rollout.wave_timeout,
        "max_in_flight": rollout.max_in_flight,
        "created_at": rollout.created_at,
        "finished_at": rollout.finished_at,
        "elapsed": round(end - rollout.created_at, 3),
        "failures": [
            {
                "device": d.device_id,
                "wave": d.wave + 1,
                "state": d.state.value,
                "code": d.error_code,
                "message": d.error_message,
            }
            for d in records
            if d.state in FAILURES
        ],
    }


def render_rollout(
    rollout: Rollout, devices: Mapping[str, DeviceRecord], now: float, *, max_failures: int = 8
) -> Group:
    """Header, one row per wave with a progress bar, the failures with their error codes."""
    records = sorted(devices.values(), key=lambda d: d.position)
    end = rollout.finished_at if rollout.finished_at is not None else now
    header = Text.assemble(
        ("Rollout ", "bold"),
        (rollout.id, "bold"),
        f"  version {rollout.version}  ",
        (rollout.state.value.upper(), _STATE_STYLE[rollout.state]),
        f"  {len(records)} devices  {format_duration(end - rollout.created_at)}",
        f"  at most {rollout.max_in_flight} at once" if rollout.max_in_flight is not None else "",
    )
    parts: list[Any] = [header]
    if rollout.reason:
        parts.append(Text(f"  {rollout.reason}", style=_STATE_STYLE[rollout.state]))

    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("wave", justify="right", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True, min_width=4)
    table.add_column("progress", width=12, no_wrap=True)
    table.add_column("done", justify="right", no_wrap=True)
    for name, _, style in _COUNT_COLUMNS:
        table.add_column(name, justify="right", style=style, no_wrap=True)
    for index in range(len(rollout.waves)):
        members = [d for d in records if d.wave == index]
        t = tally(rollout, members, index)
        started = index <= rollout.current_wave
        label = f"{index + 1}" + (" *" if index == rollout.current_wave and rollout.active else "")
        bar = ProgressBar(
            total=max(1, t.size),
            completed=t.done,
            width=12,
            complete_style="red" if t.failed and started else "green",
            finished_style="red" if t.failed else "green",
        )
        cells = [_count(members, states) for _, states, _ in _COUNT_COLUMNS]
        table.add_row(label, str(t.size), bar, f"{t.done}/{t.size}", *cells)
    parts.append(table)

    failures = [d for d in records if d.state in FAILURES]
    if failures:
        parts.append(Text(f"Failures ({len(failures)}):", style="bold"))
        for d in failures[:max_failures]:
            parts.append(
                Text.assemble(
                    f"  {d.device_id:<14} wave {d.wave + 1}  ",
                    (f"{d.state.value:<11}", "yellow" if d.state.value == "rolled_back" else "red"),
                    f" {d.error_code or '-'}",
                    (f"  {d.error_message}" if d.error_message else "", "dim"),
                )
            )
        if len(failures) > max_failures:
            parts.append(Text(f"  ... and {len(failures) - max_failures} more", style="dim"))
    return Group(*parts)


def render_rollout_list(rollouts: Iterable[Rollout], now: float) -> Table:
    table = Table(box=None, header_style="bold")
    for column in ("rollout", "version", "state", "waves", "age", "reason"):
        table.add_column(column)
    for r in rollouts:
        table.add_row(
            r.id,
            r.version,
            Text(r.state.value, style=_STATE_STYLE[r.state]),
            ",".join(str(w) for w in r.waves),
            format_duration(now - r.created_at),
            r.reason,
        )
    return table


def device_rows(
    device_ids: Iterable[str], seen: Mapping[str, DeviceSeen], now: float
) -> list[dict[str, Any]]:
    """One row per device: version, slot, last state, last seen (``fleet devices``)."""
    rows = []
    for device_id in sorted(set(device_ids) | set(seen)):
        s = seen.get(device_id)
        rows.append(
            {
                "device": device_id,
                "version": s.version if s else None,
                "slot": s.slot if s else None,
                "state": s.state if s else None,
                "job": s.job_id if s else None,
                "error": s.error_code if s else None,
                "last_seen": s.last_seen if s else None,
                "seen_ago": round(now - s.last_seen, 1) if s else None,
            }
        )
    return rows


def render_devices(rows: Iterable[Mapping[str, Any]]) -> Table:
    table = Table(box=None, header_style="bold")
    for column in ("device", "version", "slot", "last state", "error", "last seen"):
        table.add_column(column)
    for row in rows:
        ago = row["seen_ago"]
        table.add_row(
            row["device"],
            row["version"] or "-",
            row["slot"] or "-",
            row["state"] or "never reported",
            row["error"] or "",
            f"{format_duration(ago)} ago" if ago is not None else "-",
        )
    return table


def outcome_counts(devices: Iterable[DeviceRecord]) -> dict[str, int]:
    """updated / rolled back / failed / other: the demo's summary line."""
    records = list(devices)
    return {
        "updated": sum(d.state == DeviceState.SUCCEEDED for d in records),
        "rolled_back": sum(d.state == DeviceState.ROLLED_BACK for d in records),
        "failed": sum(d.state in (DeviceState.FAILED, DeviceState.TIMED_OUT) for d in records),
        "not_done": sum(d.state not in DONE for d in records),
        "skipped": sum(d.state in (DeviceState.SKIPPED, DeviceState.CANCELLED) for d in records),
    }


def _count(members: Iterable[DeviceRecord], states: frozenset[DeviceState]) -> str:
    n = sum(d.state in states for d in members)
    return str(n) if n else "·"
