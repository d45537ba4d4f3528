"""Pre-signed artifact URLs and bearer tokens: issuing and checking them with the pre-sign secret.

Token format (version 1), three dot-separated fields::

    otad1.<base64url(JSON claims)>.<base64url(HMAC-SHA256(token key, second field))>

claims ``{"dev": device id, "art": artifact id or null, "exp": unix expiry, "jti": random}``.
The prefix is the format version; the token key is derived from the pre-sign secret for tokens
only, so a token MAC never passes as a URL signature. The MAC is compared in constant time
before the claims are parsed. Tokens are bearer secrets: never logged, never in error messages.

Pure given a secret and a clock (``now=`` overrides the wall clock): no files, no sockets, so
the signing rules are tested on their own. Which device ids may be named is the PKI's rule;
the store passes it in as ``check_device``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlencode

from otad.errors import ArtifactNotFound, AuthError, AuthExpired, ConfigError, StoreBadRequest

__layer__ = "pure"

MAX_PRESIGN_SECONDS = 7 * 24 * 3600
ARTIFACT_PATH = "/v1/artifacts/{artifact_id}"
_ARTIFACT_ID = re.compile(r"^[0-9a-f]{64}$")
_DECIMAL = re.compile(r"^[0-9]{1,12}$")
_TOKEN_PREFIX = "otad1"  # noqa: S105 - a format tag, not a secret
# A credentials request is a tiny JSON object; anything bigger is not one.
MAX_CREDENTIAL_REQUEST = 4096
_CREDENTIAL_FIELDS = frozenset({"artifact", "ttl"})


def check_artifact_id(artifact_id: str) -> str:
    """``artifact_id`` if it is a SHA-256 hex id; anything else cannot name an artifact."""
    if not _ARTIFACT_ID.fullmatch(artifact_id):
        raise ArtifactNotFound(f"store: {artifact_id[:80]!r} is not an artifact id")
    return artifact_id


@dataclass(frozen=True)
class Grant:
    """What a verified credential allows: this device, this artifact (None: any), until then."""

    device_id: str
    artifact_id: str | None
    expires: int
    kind: Literal["presigned", "token"]


def _derive(secret: bytes, purpose: bytes) -> bytes:
    # One secret file, separate keys: a token MAC can never pass as a URL signature.
    return hmac.new(secret, b"otad/" + purpose, hashlib.sha256).digest()


class Signer:
    """Issues and checks pre-signed URLs and bearer tokens with the cloud's pre-sign secret."""

    def __init__(
        self,
        secret: bytes,
        base_url: str,
        *,
        check_device: Callable[[str], object] | None = None,
    ) -> None:
        if len(secret) < 32:
            raise ConfigError("store: the pre-sign secret must be at least 32 bytes")
        self._url_key = _derive(secret, b"presign-v1")
        self._token_key = _derive(secret, b"token-v1")
        self.base_url = base_url.rstrip("/")
        # Raises for a device id no URL may name (the store passes pki.validate_device_id).
        self._check_device = check_device

    # pre-signed URLs

    def _url_mac(self, method: str, path: str, device_id: str, expires: int) -> str:
        message = f"{method}\n{path}\n{device_id}\n{expires}".encode()
        return hmac.new(self._url_key, message, hashlib.sha256).hexdigest()

    def presign(
        self,
        artifact_id: str,
        device_id: str,
        expires_in: float,
        *,
        now: float | None = None,
        base_url: str | None = None,
    ) -> str:
        """A URL that lets ``device_id`` GET the artifact for ``expires_in`` seconds."""
        check_artifact_id(artifact_id)
        if self._check_device is not None:
            self._check_device(device_id)
        if not 0 < expires_in <= MAX_PRESIGN_SECONDS:
            raise ConfigError(
                f"store: pre-signed URL lifetime must be 1 s .. 7 days, not {expires_in}"
            )
        expires = int((time.time() if now is None else now) + expires_in)
        path = ARTIFACT_PATH.format(artifact_id=artifact_id)
        query = urlencode(
            {
                "device": device_id,
                "expires": str(expires),
                "signature": self._url_mac("GET", path, device_id, expires),
            }
        )
        return f"{(base_url or self.base_url).rstrip('/')}{path}?{query}"

    def check_presigned(
        self, path: str, artifact_id: str, query: Mapping[str, str], *, now: float | None = None
    ) -> Grant | None:
        """The grant of a pre-signed query; None if the query carries no signature at all."""
        fields = ("device", "expires", "signature")
        present = [name for name in fields if name in query]
        if not present:
            return None
        if len(present) != len(fields):
            raise AuthError("store: pre-signed URL is incomplete")
        device_id, expires_text, signature = (query[name] for name in fields)
        if not _DECIMAL.fullmatch(expires_text):
            raise AuthError("store: pre-signed URL has a malformed expiry")
        if not (device_id.isascii() and signature.isascii() and path.isascii()):
            raise AuthError("store: pre-signed URL signature does not match")
        expires = int(expires_text)
        expected = self._url_mac("GET", path, device_id, expires)
        if not hmac.compare_digest(expected.encode(), signature.lower().encode()):
            raise AuthError("store: pre-signed URL signature does not match")
        if (time.time() if now is None else now) >= expires:
            raise AuthExpired("store: pre-signed URL has expired")
        return Grant(device_id, artifact_id, expires, "presigned")

    # bearer tokens

    def issue_token(
        self,
        device_id: str,
        artifact_id: str | None,
        ttl: int,
        *,
        now: float | None = None,
    ) -> tuple[str, int]:
        """(token, expiry unix time) for ``device_id``, optionally limited to one artifact."""
        expires = int((time.time() if now is None else now) + ttl)
        claims = {"dev": device_id, "art": artifact_id, "exp": expires, "jti": secrets.token_hex(8)}
        body = _b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
        mac = _b64(hmac.new(self._token_key, body.encode(), hashlib.sha256).digest())
        return f"{_TOKEN_PREFIX}.{body}.{mac}", expires

    def check_token(self, token: str, *, now: float | None = None) -> Grant:
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != _TOKEN_PREFIX or not token.isascii():
            raise AuthError("store: bearer token is malformed")
        _, body, mac = parts
        expected = _b64(hmac.new(self._token_key, body.encode(), hashlib.sha256).digest())
        if not hmac.compare_digest(expected, mac):
            raise AuthError("store: bearer token signature does not match")
        try:
            claims = json.loads(_unb64(body))
            device_id, artifact_id, expires = claims["dev"], claims["art"], claims["exp"]
        except (ValueError, KeyError, TypeError) as exc:
            raise AuthError("store: bearer token is malformed") from exc
        if not isinstance(device_id, str) or type(expires) is not int:
            raise AuthError("store: bearer token is malformed")
        if artifact_id is not None and not isinstance(artifact_id, str):
            raise AuthError("store: bearer token is malformed")
        if (time.time() if now is None else now) >= expires:
            raise AuthExpired("store: bearer token has expired")
        return Grant(device_id, artifact_id, expires, "token")


@dataclass(frozen=True)
class CredentialRequest:
    """What ``POST /v1/credentials`` asks for: one artifact (None: any targeted) and a lifetime."""

    artifact_id: str | None
    ttl: int


def parse_credential_request(body: bytes, max_ttl: int) -> CredentialRequest:
    """The request in a credentials body (empty: unscoped, ``max_ttl``); the TTL is capped.

    Raises :class:`StoreBadRequest` with a ``reason`` naming what is wrong (``body_too_large``,
    ``invalid_json``, ``not_an_object``, ``unknown_field``, ``bad_artifact``, ``bad_ttl``).
    """
    if len(body) > MAX_CREDENTIAL_REQUEST:
        raise StoreBadRequest(
            f"store: credentials request over {MAX_CREDENTIAL_REQUEST} bytes",
            reason="body_too_large",
        )
    if not body.strip():
        return CredentialRequest(None, max_ttl)
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise StoreBadRequest(
            "store: credentials request body is not JSON", reason="invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise StoreBadRequest(
            "store: credentials request body must be a JSON object", reason="not_an_object"
        )
    unknown = sorted(set(data) - _CREDENTIAL_FIELDS)
    if unknown:
        raise StoreBadRequest(
            f"store: unknown field {unknown[0][:40]!r} in the credentials request",
            reason="unknown_field",
        )
    artifact = data.get("artifact")
    if artifact is not None and not (
        isinstance(artifact, str) and _ARTIFACT_ID.fullmatch(artifact)
    ):
        raise StoreBadRequest(
            "store: artifact must be an artifact id (64 lowercase hex digits)",
            reason="bad_artifact",
        )
    ttl = data.get("ttl", max_ttl)
    if type(ttl) is not int or ttl <= 0:
        raise StoreBadRequest("store: ttl must be a positive integer of seconds", reason="bad_ttl")
    return CredentialRequest(artifact, min(ttl, max_ttl))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
