"""Temporary credentials against the real HTTPS store, real client certificates, real replica.

A token is issued over mTLS for the certificate's device, optionally scoped to one artifact,
and only for an artifact the device's desired state names (the replica's database says so).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path
from typing import Any

import pytest
import structlog
from multidict import CIMultiDict
from plugins.cloud_env import CloudEnv, make_bundle

from otad.bundle import Keyring
from otad.cloud.pki import CloudDir
from otad.cloud.store import ArtifactStore

MISSING = "0" * 64


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@pytest.fixture(scope="module")
def other_bundle(cloud_dir: CloudDir, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A second, different artifact (Y) next to the session's signed bundle (X)."""
    out = tmp_path_factory.mktemp("other") / "v3.otab"
    bundle = make_bundle(cloud_dir, out, version="3.0", image_size=64 * 1024, seed=7)
    return bundle.read_bytes()


async def credential(
    cloud: CloudEnv, who: str | None, body: Any = None, *, raw: bytes | None = None
) -> tuple[int, Any]:
    kwargs: dict[str, Any] = {"json": body} if raw is None else {"data": raw}
    async with (
        cloud.http(who) as session,
        session.post(f"{cloud.store_url}/v1/credentials", **kwargs) as resp,
    ):
        return resp.status, await resp.json()


async def fetch(
    cloud: CloudEnv, artifact: str, who: str | None, token: str, **headers: str
) -> tuple[int, CIMultiDict[str], bytes]:
    url = f"{cloud.store_url}/v1/artifacts/{artifact}"
    headers["Authorization"] = f"Bearer {token}"
    async with cloud.http(who) as session, session.get(url, headers=headers) as resp:
        return resp.status, CIMultiDict(resp.headers), await resp.read()


async def refusal(cloud: CloudEnv, artifact: str, who: str | None, token: str) -> tuple[int, str]:
    status, headers, body = await fetch(cloud, artifact, who, token)
    assert headers["Content-Type"].startswith("application/json")
    assert headers["Cache-Control"] == "no-store"
    return status, json.loads(body)["error"]["code"]


async def target(cloud: CloudEnv, device: str, artifact: str, job: str = "j-1") -> None:
    """What an operator does for the token flow: a relative artifact URL with auth "token"."""
    await cloud.target(device, artifact, job_id=job)


async def token_for(cloud: CloudEnv, who: str, artifact: str | None, **extra: Any) -> str:
    status, body = await credential(cloud, who, {"artifact": artifact, **extra})
    assert status == 200, body
    assert body["device"] == who and body["artifact"] == artifact
    assert body["token_type"] == "Bearer"
    assert 0 < body["expires_in"] <= cloud.config.token_ttl
    return str(body["token"])


async def test_store_token_for_one_artifact_opens_it_and_nothing_else(
    cloud: CloudEnv, bundle_bytes: bytes, other_bundle: bytes
) -> None:
    x = await cloud.upload_bytes(bundle_bytes)
    y = await cloud.upload_bytes(other_bundle)
    await target(cloud, "dev1", x)
    token = await token_for(cloud, "dev1", x)
    status, _, data = await fetch(cloud, x, "dev1", token)
    assert (status, data) == (200, bundle_bytes)
    status, headers, data = await fetch(cloud, x, "dev1", token, Range="bytes=5-9")
    assert (status, data, headers["ETag"]) == (206, bundle_bytes[5:10], f'"{x}"')
    # X's token does not open Y, even when dev1 is later targeted by Y as well.
    assert await refusal(cloud, y, "dev1", token) == (403, "auth_wrong_artifact")
    await target(cloud, "dev1", y, job="j-2")
    assert await refusal(cloud, y, "dev1", token) == (403, "auth_wrong_artifact")


async def test_store_token_of_another_device_is_refused(
    cloud: CloudEnv, bundle_bytes: bytes
) -> None:
    x = await cloud.upload_bytes(bundle_bytes)
    await target(cloud, "dev1", x)
    await target(cloud, "dev2", x)  # dev2 may fetch X itself, just not with dev1's token
    token = await token_for(cloud, "dev1", x)
    assert await refusal(cloud, x, "dev2", token) == (403, "auth_wrong_device")
    assert await refusal(cloud, x, "fleet", token) == (403, "auth_wrong_device")
    assert await refusal(cloud, x, None, token) == (401, "auth_required")


async def test_store_expired_and_tampered_tokens_are_refused(
    cloud: CloudEnv, bundle_bytes: bytes
) -> None:
    x = await cloud.upload_bytes(bundle_bytes)
    await target(cloud, "dev1", x)
    old, _ = cloud.store.signer.issue_token("dev1", x, 5, now=time.time() - 60)
    assert await refusal(cloud, x, "dev1", old) == (403, "auth_expired")
    good = await token_for(cloud, "dev1", x)
    prefix, claims, mac = good.split(".")
    forged_claims = json.loads(_unb64(claims)) | {"exp": int(time.time()) + 10**6}
    for bad in (
        f"{prefix}.{claims}.{mac[:-3]}xyz",  # MAC flipped
        f"{prefix}.{_b64(json.dumps(forged_claims).encode())}.{mac}",  # claims changed
        f"otad2.{claims}.{mac}",  # unknown version
        f"{prefix}.{claims}",
        "x" * 300,
    ):
        assert await refusal(cloud, x, "dev1", bad) == (403, "auth_failed"), bad
    async with (
        cloud.http("dev1") as session,
        session.get(
            f"{cloud.store_url}/v1/artifacts/{x}", headers={"Authorization": f"Basic {good}"}
        ) as resp,
    ):
        assert (resp.status, (await resp.json())["error"]["code"]) == (403, "auth_failed")


async def test_store_no_token_for_an_artifact_the_device_is_not_targeted_by(
    cloud: CloudEnv, bundle_bytes: bytes, other_bundle: bytes
) -> None:
    x = await cloud.upload_bytes(bundle_bytes)
    y = await cloud.upload_bytes(other_bundle)
    # No desired state at all, then a desired state naming another artifact.
    status, body = await credential(cloud, "dev3", {"artifact": x})
    assert (status, body["error"]["code"]) == (403, "artifact_not_targeted")
    await target(cloud, "dev3", y)
    status, body = await credential(cloud, "dev3", {"artifact": x})
    assert (status, body["error"]["code"]) == (403, "artifact_not_targeted")
    # An id that is not stored looks the same to a device that is not targeted by it...
    status, body = await credential(cloud, "dev3", {"artifact": MISSING})
    assert (status, body["error"]["code"]) == (403, "artifact_not_targeted")
    # ...and is 404 once the desired state names it (the operator's mistake, not the device's).
    await target(cloud, "dev3", MISSING, job="j-2")
    status, body = await credential(cloud, "dev3", {"artifact": MISSING})
    assert (status, body["error"]["code"]) == (404, "artifact_not_found")


async def test_store_unscoped_token_follows_the_desired_state(
    cloud: CloudEnv, bundle_bytes: bytes, other_bundle: bytes
) -> None:
    x = await cloud.upload_bytes(bundle_bytes)
    y = await cloud.upload_bytes(other_bundle)
    token = await token_for(cloud, "dev4", None, ttl=60)
    assert await refusal(cloud, x, "dev4", token) == (403, "artifact_not_targeted")
    await target(cloud, "dev4", x)
    status, _, data = await fetch(cloud, x, "dev4", token)
    assert (status, data) == (200, bundle_bytes)
    assert await refusal(cloud, y, "dev4", token) == (403, "artifact_not_targeted")
    await target(cloud, "dev4", y, job="j-2")
    assert (await fetch(cloud, y, "dev4", token))[0] == 200
    assert await refusal(cloud, x, "dev4", token) == (403, "artifact_not_targeted")
    # A pre-signed desired URL names its artifact just as well.
    await cloud.set_desired(
        "dev4", {"software": {"url": cloud.presign(x, "dev4"), "auth": None, "jobId": "j-3"}}
    )
    assert (await fetch(cloud, x, "dev4", token))[0] == 200


@pytest.mark.parametrize(
    ("who", "raw", "status", "code", "reason"),
    [
        (None, b"", 401, "auth_required", None),
        ("fleet", b"", 403, "auth_failed", None),
        ("dev1", b"{not json", 400, "store_bad_request", "invalid_json"),
        ("dev1", b"\xff\xfe{}", 400, "store_bad_request", "invalid_json"),
        ("dev1", b"[1, 2]", 400, "store_bad_request", "not_an_object"),
        ("dev1", b"null", 400, "store_bad_request", "not_an_object"),
        ("dev1", b'{"artifact": 7}', 400, "store_bad_request", "bad_artifact"),
        ("dev1", b'{"artifact": "nothex"}', 400, "store_bad_request", "bad_artifact"),
        ("dev1", b'{"ttl": -1}', 400, "store_bad_request", "bad_ttl"),
        ("dev1", b'{"ttl": "5"}', 400, "store_bad_request", "bad_ttl"),
        ("dev1", b'{"ttl": true}', 400, "store_bad_request", "bad_ttl"),
        ("dev1", b'{"device": "dev2"}', 400, "store_bad_request", "unknown_field"),
        ("dev1", b'{"ttl": 1}' + b" " * 5000, 400, "store_bad_request", "body_too_large"),
    ],
)
async def test_store_credentials_refusals(
    cloud: CloudEnv, who: str | None, raw: bytes, status: int, code: str, reason: str | None
) -> None:
    got_status, got = await credential(cloud, who, raw=raw)
    assert (got_status, got["error"]["code"]) == (status, code)
    assert got["error"].get("reason") == reason


async def test_store_credentials_ttl_is_capped_and_empty_body_is_unscoped(
    cloud: CloudEnv,
) -> None:
    status, body = await credential(cloud, "dev1", {"ttl": 10**9})
    assert status == 200 and body["expires_in"] == cloud.config.token_ttl
    status, body = await credential(cloud, "dev1", raw=b"")
    assert status == 200 and body["artifact"] is None
    assert body["expires_in"] == cloud.config.token_ttl
    assert abs(body["expires_at"] - (time.time() + cloud.config.token_ttl)) < 30


async def test_store_never_logs_query_strings_or_tokens(
    cloud: CloudEnv, bundle_bytes: bytes
) -> None:
    x = await cloud.upload_bytes(bundle_bytes)
    await target(cloud, "dev1", x)
    url = cloud.presign(x, "dev1", 60)
    signature = url.rsplit("signature=", 1)[1]
    with structlog.testing.capture_logs() as logs:
        async with cloud.http("dev1") as session:
            async with session.get(url) as resp:
                await resp.read()
            async with session.get(url.replace("device=dev1", "device=dev2")) as resp:
                await resp.read()
        token = await token_for(cloud, "dev1", x)
        await fetch(cloud, x, "dev1", token)
        await fetch(cloud, x, "dev2", token)
        await fetch(cloud, x, "dev1", token[:-2] + "AA")
    text = repr(logs)
    assert "request_served" in text and "request_refused" in text
    assert "credential_issued" in text
    assert signature not in text and token not in text and token.split(".")[2] not in text
    assert "?" not in "".join(str(e.get("path", "")) for e in logs)


async def test_store_on_its_own_reads_targets_from_the_replica_database(
    cloud: CloudEnv, bundle_bytes: bytes, other_bundle: bytes, tmp_path: Path
) -> None:
    """A store in another process (no targets handed in) reads the replica's database file."""
    x = await cloud.upload_bytes(bundle_bytes)
    y = await cloud.upload_bytes(other_bundle)
    alone = ArtifactStore(
        cloud.config,  # same database and artifacts as the running replica
        keyring=Keyring.load(cloud.cloud_dir.keyring_dir),
        ssl_context=cloud.cloud_dir.server_context(),
        host="127.0.0.1",
        port=0,
    )
    async with alone:
        url = f"{alone.url}/v1/credentials"
        async with cloud.http("dev2") as session:

            async def ask(artifact: str) -> int:
                async with session.post(url, json={"artifact": artifact}) as resp:
                    return resp.status

            # Parallel first requests: the database is opened once and every answer is right.
            assert await asyncio.gather(*(ask(x) for _ in range(6))) == [403] * 6
            await target(cloud, "dev2", x)
            async with session.post(url, json={"artifact": x}) as resp:
                assert resp.status == 200
                token = (await resp.json())["token"]
            auth = {"Authorization": f"Bearer {token}"}
            async with session.get(f"{alone.url}/v1/artifacts/{x}", headers=auth) as resp:
                assert resp.status == 200 and await resp.read() == bundle_bytes
            # The replica moves dev2 on: the standalone store sees the new desired state.
            await target(cloud, "dev2", y, job="j-2")
            async with session.post(url, json={"artifact": x}) as resp:
                assert resp.status == 403
            async with session.post(url, json={"artifact": y}) as resp:
                assert resp.status == 200


async def test_store_without_a_database_issues_no_scoped_tokens(
    cloud: CloudEnv, bundle_bytes: bytes, tmp_path: Path
) -> None:
    x = await cloud.upload_bytes(bundle_bytes)
    await target(cloud, "dev1", x)
    config = cloud.config.with_overrides(db_path=tmp_path / "none" / "shadow.db")
    alone = ArtifactStore(
        config,
        keyring=Keyring.load(cloud.cloud_dir.keyring_dir),
        ssl_context=cloud.cloud_dir.server_context(),
        host="127.0.0.1",
        port=0,
    )
    async with (
        alone,
        cloud.http("dev1") as session,
        session.post(f"{alone.url}/v1/credentials", json={"artifact": x}) as resp,
    ):
        assert resp.status == 403
        assert (await resp.json())["error"]["code"] == "artifact_not_targeted"
    assert not config.db_path.parent.exists()  # it created no database of its own


async def test_store_parallel_credential_requests_each_get_their_own_token(
    cloud: CloudEnv, bundle_bytes: bytes
) -> None:
    x = await cloud.upload_bytes(bundle_bytes)
    for device in ("dev1", "dev2", "dev3", "dev4"):
        await target(cloud, device, x)
    answers = await asyncio.gather(
        *(credential(cloud, d, {"artifact": x}) for d in ("dev1", "dev2", "dev3", "dev4") * 3)
    )
    assert [status for status, _ in answers] == [200] * 12
    assert len({body["token"] for _, body in answers}) == 12  # jti: never the same token


async def test_store_token_with_binding_id_needs_no_certificate_but_keeps_its_scope(
    cloud: CloudEnv, bundle_bytes: bytes, other_bundle: bytes
) -> None:
    x = await cloud.upload_bytes(bundle_bytes)
    y = await cloud.upload_bytes(other_bundle)
    await target(cloud, "dev1", x)
    token = await token_for(cloud, "dev1", x)  # issued over mTLS, always
    cloud.store.config = cloud.store.config.with_overrides(presign_binding="id")
    status, _, data = await fetch(cloud, x, None, token)
    assert (status, data) == (200, bundle_bytes)
    assert await refusal(cloud, y, None, token) == (403, "auth_wrong_artifact")
    assert await refusal(cloud, x, "dev2", token) == (403, "auth_wrong_device")
    # Credentials themselves still need the device certificate.
    status, body = await credential(cloud, None, {"artifact": x})
    assert (status, body["error"]["code"]) == (401, "auth_required")
