"""Pure parts of the store: the Range parser, pre-signed URLs and tokens (no sockets)."""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otad.cloud.pki import validate_device_id
from otad.cloud.store_auth import (
    MAX_CREDENTIAL_REQUEST,
    CredentialRequest,
    Signer,
    parse_credential_request,
)
from otad.cloud.store_range import ByteRange, if_range_holds, none_match, parse_range
from otad.cloud.store_targets import targeted_artifacts
from otad.errors import (
    ArtifactNotFound,
    AuthError,
    AuthExpired,
    ConfigError,
    RangeNotSatisfiable,
    StoreBadRequest,
)

SECRET = b"k" * 32
ART = "ab" * 32
OTHER = "cd" * 32
NOW = 1_800_000_000.0


def reference_range(header: str, size: int) -> ByteRange | str | None:
    """An independent model of RFC 9110 single-range semantics ("416" for unsatisfiable)."""
    m = re.fullmatch(r"\s*bytes\s*=\s*([0-9]*)-([0-9]*)\s*", header, flags=re.I)
    if not m or (not m.group(1) and not m.group(2)):
        return None
    first, last = m.groups()
    if first:
        a = int(first)
        b = int(last) if last else None
        if b is not None and b < a:
            return None
        if a >= size:
            return "416"
        return ByteRange(a, size if b is None else min(b + 1, size))
    n = int(last)
    if n == 0 or size == 0:
        return "416"
    return ByteRange(max(0, size - n), size)


def run(header: str, size: int) -> ByteRange | str | None:
    try:
        return parse_range(header, size)
    except RangeNotSatisfiable:
        return "416"


numbers = st.one_of(st.none(), st.integers(0, 3000).map(str), st.integers(0, 2**70).map(str))


@settings(deadline=None)  # shared CI machine: no per-example wall-clock limit
@given(size=st.integers(0, 2000), first=numbers, last=numbers)
def test_store_parse_range_matches_reference_model(
    size: int, first: str | None, last: str | None
) -> None:
    header = f"bytes={first or ''}-{last or ''}"
    got = run(header, size)
    assert got == reference_range(header, size)
    if isinstance(got, ByteRange):
        assert 0 <= got.start < got.stop <= size
        assert got.content_range(size) == f"bytes {got.start}-{got.stop - 1}/{size}"


@settings(deadline=None)  # shared CI machine: no per-example wall-clock limit
@given(header=st.text(max_size=40), size=st.integers(0, 10**12))
def test_store_parse_range_garbage_never_crashes(header: str, size: int) -> None:
    got = run(header, size)
    assert got is None or got == "416" or isinstance(got, ByteRange)


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "bytes",
        "bytes=",
        "bytes=-",
        "items=0-1",
        "bytes=5-2",
        "bytes=a-b",
        "bytes=0-1,3-4",
        "bytes=\u0663-",
    ],
)
def test_store_parse_range_ignores_unusable_headers(header: str | None) -> None:
    assert parse_range(header, 100) is None


def test_store_parse_range_examples() -> None:
    assert parse_range("bytes=0-0", 10) == ByteRange(0, 1)
    assert parse_range("bytes=3-", 10) == ByteRange(3, 10)
    assert parse_range("bytes=-4", 10) == ByteRange(6, 10)
    assert parse_range("bytes=-40", 10) == ByteRange(0, 10)
    assert parse_range("bytes=8-99", 10) == ByteRange(8, 10)
    assert parse_range("BYTES=1-2", 10) == ByteRange(1, 3)
    for unsatisfiable in ("bytes=10-", "bytes=10-20", "bytes=-0"):
        with pytest.raises(RangeNotSatisfiable):
            parse_range(unsatisfiable, 10)


def query_of(url: str) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(url).query))


def test_store_presign_round_trip_and_binding_fields() -> None:
    signer = Signer(SECRET, "https://10.0.2.100:8443/")
    url = signer.presign(ART, "dev1", 60, now=NOW)
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}" == "https://10.0.2.100:8443"
    assert parts.path == f"/v1/artifacts/{ART}"
    grant = signer.check_presigned(parts.path, ART, query_of(url), now=NOW + 59)
    assert grant is not None
    assert (grant.device_id, grant.artifact_id, grant.expires) == ("dev1", ART, int(NOW) + 60)


def test_store_presign_refuses_expired_and_tampered_urls() -> None:
    signer = Signer(SECRET, "https://127.0.0.1:8443")
    url = signer.presign(ART, "dev1", 60, now=NOW)
    path, query = urlsplit(url).path, query_of(url)
    with pytest.raises(AuthExpired):
        signer.check_presigned(path, ART, query, now=NOW + 60)
    tampered = [
        {**query, "device": "dev2"},
        {**query, "expires": str(int(query["expires"]) + 3600)},
        {**query, "signature": "0" * 64},
        {**query, "signature": query["signature"][:-1]},
        {**query, "expires": "-5"},
        {k: v for k, v in query.items() if k != "device"},
    ]
    for q in tampered:
        with pytest.raises(AuthError) as info:
            signer.check_presigned(path, ART, q, now=NOW)
        assert not isinstance(info.value, AuthExpired)
    with pytest.raises(AuthError):  # the URL of one artifact does not open another
        signer.check_presigned(f"/v1/artifacts/{OTHER}", OTHER, query, now=NOW)
    with pytest.raises(AuthError):  # another secret
        Signer(b"x" * 32, "https://h").check_presigned(path, ART, query, now=NOW)
    assert signer.check_presigned(path, ART, {}, now=NOW) is None


@pytest.mark.parametrize("lifetime", [0, -1, 7 * 24 * 3600 + 1])
def test_store_presign_rejects_bad_lifetimes(lifetime: float) -> None:
    with pytest.raises(ConfigError):
        Signer(SECRET, "https://h").presign(ART, "dev1", lifetime)


def test_store_signer_needs_a_long_secret() -> None:
    with pytest.raises(ConfigError):
        Signer(b"short", "https://h")


def test_store_token_round_trip_expiry_and_tampering() -> None:
    signer = Signer(SECRET, "https://h")
    token, expires = signer.issue_token("dev3", ART, 30, now=NOW)
    assert expires == int(NOW) + 30
    grant = signer.check_token(token, now=NOW + 1)
    assert (grant.device_id, grant.artifact_id, grant.kind) == ("dev3", ART, "token")
    with pytest.raises(AuthExpired):
        signer.check_token(token, now=NOW + 30)
    prefix, body, mac = token.split(".")
    for bad in [
        f"{prefix}.{body}.{mac[:-2]}AA",
        f"{prefix}.{body[:-2]}.{mac}",
        f"otad2.{body}.{mac}",
        "garbage",
        "",
        f"{prefix}.{body}",
    ]:
        with pytest.raises(AuthError) as info:
            signer.check_token(bad, now=NOW)
        assert not isinstance(info.value, AuthExpired)
    # A token MAC is not a URL signature (separate derived keys).
    url_sig = query_of(signer.presign(ART, "dev3", 60, now=NOW))["signature"]
    assert url_sig not in token


@settings(deadline=None)  # shared CI machine: no per-example wall-clock limit
@given(data=st.data(), artifact=st.sampled_from([ART, None]))
def test_store_token_any_changed_character_is_refused(
    data: st.DataObject, artifact: str | None
) -> None:
    signer = Signer(SECRET, "https://h")
    token, _ = signer.issue_token("dev1", artifact, 60, now=NOW)
    at = data.draw(st.integers(0, len(token) - 1))
    char = data.draw(st.characters(codec="ascii").filter(lambda c: c != token[at]))
    with pytest.raises(AuthError) as info:
        signer.check_token(token[:at] + char + token[at + 1 :], now=NOW)
    assert not isinstance(info.value, AuthExpired)


@settings(deadline=None)  # shared CI machine: no per-example wall-clock limit
@given(st.text(max_size=200))
def test_store_check_token_garbage_only_raises_auth_error(text: str) -> None:
    with pytest.raises(AuthError):
        Signer(SECRET, "https://h").check_token(text, now=NOW)


@settings(deadline=None)  # shared CI machine: no per-example wall-clock limit
@given(
    query=st.dictionaries(
        st.sampled_from(["device", "expires", "signature", "other"]), st.text(max_size=70)
    ),
    path=st.text(max_size=80),
)
def test_store_check_presigned_garbage_only_raises_auth_error(
    query: dict[str, str], path: str
) -> None:
    signer = Signer(SECRET, "https://h")
    try:
        grant = signer.check_presigned(path, ART, query, now=NOW)
    except AuthError:
        return
    assert grant is None or grant.device_id == query["device"]


def test_store_presigned_expiry_must_be_ascii_digits() -> None:
    signer = Signer(SECRET, "https://h")
    url = signer.presign(ART, "dev1", 60, now=NOW)
    query = query_of(url)
    arabic = query["expires"].translate(
        str.maketrans("0123456789", "\u0660\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668\u0669")
    )
    with pytest.raises(AuthError, match="malformed expiry"):
        signer.check_presigned(urlsplit(url).path, ART, {**query, "expires": arabic}, now=NOW)


ETAG = f'"{ART}"'
LAST_MODIFIED = "Tue, 01 Jan 2030 00:00:00 GMT"


@pytest.mark.parametrize(
    ("header", "holds"),
    [
        (None, True),
        (ETAG, True),
        (f" {ETAG} ", True),
        (f'"{OTHER}"', False),
        (f"W/{ETAG}", False),  # weak validators never satisfy If-Range
        (LAST_MODIFIED, True),
        ("Wed, 02 Jan 2030 00:00:00 GMT", False),
        ("", False),
    ],
)
def test_store_if_range_honours_only_a_matching_validator(header: str | None, holds: bool) -> None:
    assert if_range_holds(header, ETAG, LAST_MODIFIED) is holds


@pytest.mark.parametrize(
    ("header", "matches"),
    [
        (None, False),
        ("*", True),
        (ETAG, True),
        (f"W/{ETAG}", True),  # If-None-Match compares weakly
        (f'"{OTHER}", {ETAG}', True),
        (f'"{OTHER}"', False),
        ("", False),
    ],
)
def test_store_none_match_compares_weakly(header: str | None, matches: bool) -> None:
    assert none_match(header, ETAG) is matches


def test_store_presign_applies_the_device_rule_and_artifact_id_format() -> None:
    signer = Signer(SECRET, "https://h", check_device=validate_device_id)
    for device in ("otad-svc-fleet", "bad/id", ""):
        with pytest.raises(ConfigError):
            signer.presign(ART, device, 60, now=NOW)
    with pytest.raises(ArtifactNotFound):
        signer.presign("AB" * 32, "dev1", 60, now=NOW)


# --- credential requests and targets --------------------------------------------------------------


def test_store_credential_request_examples() -> None:
    assert parse_credential_request(b"", 900) == CredentialRequest(None, 900)
    assert parse_credential_request(b"  \n", 900) == CredentialRequest(None, 900)
    assert parse_credential_request(b"{}", 900) == CredentialRequest(None, 900)
    body = json.dumps({"artifact": ART, "ttl": 60}).encode()
    assert parse_credential_request(body, 900) == CredentialRequest(ART, 60)
    assert parse_credential_request(b'{"ttl": 5000, "artifact": null}', 900) == CredentialRequest(
        None, 900
    )


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{", "invalid_json"),
        (b"\xff", "invalid_json"),
        (b"[" * 100_000, "body_too_large"),
        (b"[" * 4000, "invalid_json"),  # deeply nested but small: refused, not a crash
        (b'"x"', "not_an_object"),
        (b'{"artifact": "AB' + b"0" * 62 + b'"}', "bad_artifact"),
        (b'{"artifact": ["x"]}', "bad_artifact"),
        (b'{"ttl": 0}', "bad_ttl"),
        (b'{"ttl": 1.5}', "bad_ttl"),
        (b'{"ttl": false}', "bad_ttl"),
        (b'{"scope": "all"}', "unknown_field"),
    ],
)
def test_store_credential_request_refusals_name_the_reason(body: bytes, reason: str) -> None:
    with pytest.raises(StoreBadRequest) as info:
        parse_credential_request(body, 900)
    assert info.value.details["reason"] == reason


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=70),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=10,
)


@settings(deadline=None)  # shared CI machine: no per-example wall-clock limit
@given(
    body=st.one_of(
        st.binary(max_size=MAX_CREDENTIAL_REQUEST + 10),
        st.dictionaries(st.sampled_from(["artifact", "ttl", "x"]), json_values).map(
            lambda d: json.dumps(d).encode()
        ),
    )
)
def test_store_credential_request_garbage_is_a_bad_request_or_a_valid_request(
    body: bytes,
) -> None:
    got: CredentialRequest | None = None
    reason = None
    try:
        got = parse_credential_request(body, 900)
    except StoreBadRequest as exc:
        reason = exc.details["reason"]
    if got is None:
        assert reason in {
            "body_too_large",
            "invalid_json",
            "not_an_object",
            "unknown_field",
            "bad_artifact",
            "bad_ttl",
        }
        return
    assert 0 < got.ttl <= 900
    assert got.artifact_id is None or re.fullmatch("[0-9a-f]{64}", got.artifact_id)


@pytest.mark.parametrize(
    ("desired", "expected"),
    [
        ({"software": {"url": f"/v1/artifacts/{ART}"}}, {ART}),
        ({"software": {"url": f"https://h:8443/v1/artifacts/{ART}?device=d&signature=x"}}, {ART}),
        ({"software": {"url": f"https://h/ota/v1/artifacts/{ART}"}}, {ART}),  # behind a prefix
        ({"software": {"url": f"/v1/artifacts/{ART}/manifest"}}, set()),
        ({"software": {"url": f"/v1/artifacts/{ART.upper()}"}}, set()),
        ({"software": {"url": f"/v2/artifacts/{ART}"}}, set()),
        ({"software": {"url": f"https://h/x?u=/v1/artifacts/{ART}"}}, set()),  # not the path
        ({"software": {"url": 7}}, set()),
        ({"software": f"/v1/artifacts/{ART}"}, set()),
        ({"other": {"url": f"/v1/artifacts/{ART}"}}, set()),
        ({}, set()),
    ],
)
def test_store_targets_are_the_artifact_of_the_desired_software_url(
    desired: dict[str, Any], expected: set[str]
) -> None:
    assert targeted_artifacts(desired) == expected


@settings(deadline=None)  # shared CI machine: no per-example wall-clock limit
@given(desired=st.dictionaries(st.sampled_from(["software", "x"]), json_values))
def test_store_targets_garbage_names_nothing_or_an_artifact_id(desired: dict[str, Any]) -> None:
    got = targeted_artifacts(desired)
    assert len(got) <= 1
    assert all(re.fullmatch("[0-9a-f]{64}", a) for a in got)


@settings(deadline=None)  # shared CI machine: no per-example wall-clock limit
@given(url=st.text(max_size=200))
def test_store_targets_any_url_text_never_crashes(url: str) -> None:
    got = targeted_artifacts({"software": {"url": url}})
    assert got <= {url[-64:]}
