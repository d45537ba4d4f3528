"""`otad shadow get/update` as a user runs them, against the real broker and replica."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import pytest

from otad.cloud.pki import CloudDir
from otad.cloud.replica import Replica


async def otad(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "otad",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_shadow_cli_update_then_get(
    cloud_dir: CloudDir, broker: Any, replica: Replica
) -> None:
    root = str(cloud_dir.root)
    code, out, err = await otad(
        "shadow",
        "update",
        root,
        "dev1",
        "--desired",
        '{"software": {"version": "3"}}',
        "--reported",
        '{"software": {"version": "2"}}',
    )
    assert code == 0, err
    accepted = json.loads(out)
    assert accepted["version"] == 1
    code, out, err = await otad("shadow", "get", root, "dev1")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["state"]["delta"] == {"software": {"version": "3"}}
    code, out, err = await otad(
        "shadow", "update", root, "dev1", "--reported", '{"software": null}', "--version", "1"
    )
    assert code == 0, err
    assert json.loads(out)["version"] == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--desired", "{not json"], "shadow_bad_request"),
        (["--desired", "[1]"], "shadow_bad_request"),
        ([], "shadow_bad_request"),
        (["--reported", '{"a": 1}', "--version", "99"], "shadow_version_conflict"),
    ],
)
async def test_shadow_cli_update_errors_exit_1_with_the_code(
    cloud_dir: CloudDir, broker: Any, replica: Replica, args: list[str], message: str
) -> None:
    code, out, err = await otad("shadow", "update", str(cloud_dir.root), "dev2", *args)
    assert code == 1
    assert message in err and "Traceback" not in err
    assert out == ""


async def test_shadow_cli_get_unknown_device_is_404(
    cloud_dir: CloudDir, broker: Any, replica: Replica
) -> None:
    code, _, err = await otad("shadow", "get", str(cloud_dir.root), "dev4")
    assert code == 1 and "shadow_not_found" in err


def test_shadow_cli_imports_no_network_library_at_module_level() -> None:
    """`otad bundle` must start without aiomqtt/aiohttp: this module imports them lazily."""
    import ast
    from pathlib import Path

    import otad.cli.shadow as cli

    tree = ast.parse(Path(cli.__file__).read_text())
    top_level = [node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)]
    names = {
        (node.module if isinstance(node, ast.ImportFrom) else node.names[0].name) or ""
        for node in top_level
    }
    assert not {n for n in names if n.startswith(("otad.cloud", "aiomqtt", "aiohttp"))}
