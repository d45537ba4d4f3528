"""The artifact store: signed bundles over HTTPS, fetched only by the device they were issued to.

Endpoints (``docs/cloud.md`` has the full table)::

    POST /v1/artifacts           upload a bundle (mTLS, CN in ``store.uploaders``); 201 + id
    PUT /v1/artifacts/{id}       the same, idempotent, the body must hash to {id}
    GET|HEAD /v1/artifacts/{id}  download; Range/If-Range/ETag; pre-signed query or Bearer token
    POST /v1/credentials         mTLS device -> short-lived Bearer token (optionally one artifact)
    GET /v1/artifacts[/{id}/manifest]  the catalogue, for service identities (mTLS)
    GET /v1/health               liveness, no auth

Artifact id = the SHA-256 (hex) of the whole bundle file. It is content addressed: the same bundle
uploaded twice is one artifact, and the ETag (the id, quoted) is a strong validator for free.

Authorisation of a download is one of:

- a pre-signed URL: ``?device=<id>&expires=<unix>&signature=<hex>`` where the signature is
  HMAC-SHA256 (key derived from the pre-sign secret) over ``GET``, the URL path, the device id
  and the expiry. The host is not signed, so a URL stays valid behind another public address.
- ``Authorization: Bearer <token>`` from ``POST /v1/credentials``.

Tokens and targets: a device asks ``POST /v1/credentials`` (over mTLS; the certificate is the
proof of identity) with ``{"artifact": "<id>", "ttl": <s>}``, both optional. A token for one
artifact is issued only if the device's desired state names that artifact
(:mod:`store_targets`), else 403 ``artifact_not_targeted``; it then opens that artifact only
(403 ``auth_wrong_artifact`` for another). An unscoped token opens whatever artifact the desired
state names at the time of each request. A scoped token stays valid until it expires even if the
desired state moves on, like a pre-signed URL (at most ``store.token_ttl``).

Binding (``store.presign_binding``): with ``certificate`` (the default) the request must come over
mTLS with the client certificate whose CN is the device the URL/token names; with ``id`` the URL
or token alone suffices, but a client certificate that is presented must still name that device.

Bodies are streamed by a plain handler reading large chunks in a worker thread: aiohttp's
FileResponse over TLS runs at a fraction of the speed. Query strings and tokens are never
logged; aiohttp's access log is off and the store logs its own ``request_served`` events.

This module is the HTTP service only; it builds on ``store_range`` (Range/If-Range, pure),
``store_auth`` (pre-signed URLs and tokens, pure) and ``store_files`` (the catalogue on disk).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web

from otad.bundle import Keyring
from otad.cloud.config import CloudConfig
from otad.cloud.pki import SERVICE_PREFIX, validate_device_id
from otad.cloud.store_auth import (
    ARTIFACT_PATH,
    MAX_CREDENTIAL_REQUEST,
    Grant,
    Signer,
    check_artifact_id,
    parse_credential_request,
)
from otad.cloud.store_files import CHUNK, ArtifactRepository, BundleReader
from otad.cloud.store_range import ByteRange, if_range_holds, none_match, parse_range
from otad.cloud.store_targets import DatabaseTargets, Targets
from otad.errors import (
    ArtifactNotFound,
    ArtifactNotTargeted,
    ArtifactRejected,
    AuthError,
    AuthRequired,
    AuthWrongArtifact,
    AuthWrongDevice,
    OtadError,
    RangeNotSatisfiable,
    StoreBadRequest,
    StoreError,
)

__layer__ = "service"

# Other modules and tools import these from here.
__all__ = [
    "SHUTDOWN_GRACE",
    "ArtifactRepository",
    "ArtifactStore",
    "peer_common_name",
    "presign",
]

log = structlog.get_logger(__name__)

SHUTDOWN_GRACE = 5.0
# The smallest read of the adaptive chunk size: below it the per-chunk Python work dominates
# (measured: 128 KiB chunks cost about twice the CPU per GiB of 1 MiB chunks).
MIN_CHUNK = 64 * 1024
# Buffers one download holds per chunk size: the chunk being sent, the read-ahead, the TLS
# transport's encrypted copy waiting for the socket, and allocator slack. Measured with curl
# clients stalled at 20 KiB/s: 1.3 / 1.5 / 1.8 / 4.9 MiB of RSS per download at 64 KiB / 128 KiB
# / 256 KiB / 1 MiB chunks, i.e. about 1.1 MiB per connection plus 3-4 chunks.
BUFFERS_PER_CHUNK = 4
# How long stop() waits for reads in worker threads to return and close their files.
READ_CLOSE_TIMEOUT = 10.0


def presign(
    config: CloudConfig, artifact_id: str, device_id: str, expires_in: float | None = None
) -> str:
    """A pre-signed download URL for ``device_id`` (what a rollout puts in the desired state)."""
    signer = Signer(
        config.read_presign_secret(),
        config.store_public_url,
        check_device=validate_device_id,
    )
    ttl = config.presign_default_ttl if expires_in is None else expires_in
    return signer.presign(artifact_id, device_id, ttl)


_STATUS: list[tuple[type[OtadError], int]] = [
    (AuthRequired, 401),
    (AuthError, 403),  # includes AuthExpired
    (ArtifactNotFound, 404),
    (RangeNotSatisfiable, 416),
    (ArtifactRejected, 422),
    (StoreBadRequest, 400),
]


def _error_response(exc: OtadError) -> web.Response:
    status = exc.details.get("status") or next(
        (code for cls, code in _STATUS if isinstance(exc, cls)), 500
    )
    body: dict[str, Any] = {"error": exc.to_wire()}
    if "reason" in exc.details:
        body["error"]["reason"] = exc.details["reason"]
    headers = {"Cache-Control": "no-store"}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="otad"'
    if isinstance(exc, RangeNotSatisfiable) and "size" in exc.details:
        headers["Content-Range"] = f"bytes */{exc.details['size']}"
    return web.json_response(body, status=status, headers=headers)


def _http_error_response(exc: web.HTTPException) -> web.Response:
    code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(
        exc.status, "http_error"
    )
    headers = {"Cache-Control": "no-store"}
    if "Allow" in exc.headers:
        headers["Allow"] = exc.headers["Allow"]
    return web.json_response(
        {"error": {"code": code, "message": exc.reason}}, status=exc.status, headers=headers
    )


def peer_common_name(request: web.BaseRequest) -> str | None:
    """The CN of the verified client certificate of this connection, if one was presented."""
    transport = request.transport
    if transport is None:
        return None
    cert = transport.get_extra_info("peercert")
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def chunk_for(active: int, budget: int, largest: int) -> int:
    """Read size for each of ``active`` downloads sharing ``budget`` bytes of buffers.

    ``largest`` (the configured chunk) while the budget allows it, smaller with more downloads,
    never below MIN_CHUNK (or ``largest``, if that is smaller); multiples of MIN_CHUNK.
    """
    share = budget // (BUFFERS_PER_CHUNK * max(1, active))
    fitting = min(largest, share - share % MIN_CHUNK)
    return max(min(largest, MIN_CHUNK), fitting)


def _abandon(read: asyncio.Future[bytes]) -> None:
    """Drop a read-ahead nobody will use: unstarted it never runs, running its result is lost."""
    if read.done():
        if not read.cancelled():
            read.exception()  # retrieved: a failed read-ahead is not an unhandled error
    else:
        read.cancel()


class ArtifactStore:
    """The store's aiohttp application plus its HTTPS listener."""

    def __init__(
        self,
        config: CloudConfig,
        *,
        keyring: Keyring,
        ssl_context: ssl.SSLContext,
        host: str | None = None,
        port: int | None = None,
        public_url: str | None = None,
        chunk_size: int = CHUNK,
        targets: Targets | None = None,
        shutdown_grace: float = SHUTDOWN_GRACE,
    ) -> None:
        self.config = config
        self.repository = ArtifactRepository(config.artifacts_dir)
        self.keyring = keyring
        self.ssl_context = ssl_context
        self.host = host or config.store_host
        self.port = config.store_port if port is None else port
        # URLs follow the listener when it was moved (tests, a second instance) and the config
        # names no public address of its own; an explicit public URL always wins.
        config_host = f"[{config.store_host}]" if ":" in config.store_host else config.store_host
        derived = f"https://{config_host}:{config.store_port}"
        self._follow_listener = (
            public_url is None
            and (host is not None or port is not None)
            and config.store_public_url == derived
        )
        self.signer = Signer(
            config.read_presign_secret(),
            public_url or config.store_public_url,
            check_device=validate_device_id,
        )
        self.chunk_size = chunk_size
        # Who is targeted by what; on its own the store reads the replica's database file.
        self.targets: Targets = targets or DatabaseTargets(config.db_path)
        self.shutdown_grace = shutdown_grace
        self.read_close_timeout = READ_CLOSE_TIMEOUT
        # Bundle files of downloads in flight; stop() waits until each descriptor is closed.
        self._readers: set[BundleReader] = set()
        self._sending = 0  # downloads streaming a body right now (they share the buffer budget)
        self._runner: web.AppRunner | None = None
        self.app = self._make_app()

    # lifecycle

    async def start(self) -> None:
        self.config.artifacts_dir.mkdir(parents=True, exist_ok=True)
        swept = await asyncio.to_thread(self.repository.sweep_incoming)
        if swept:
            log.info("incoming_swept", files=swept)
        # On stop, downloads in flight get a few seconds; a device resumes with Range after.
        # aiohttp waits up to the timeout twice (for handlers to finish, then after cancelling
        # them), hence half.
        self._runner = web.AppRunner(
            self.app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=self.shutdown_grace / 2,
        )
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, self.host, self.port, ssl_context=self.ssl_context, reuse_address=True
        )
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            self._runner = None
            raise StoreError(
                f"store: cannot listen on {self.host}:{self.port}: {exc.strerror or exc}"
            ) from exc
        addresses = self._runner.addresses
        if addresses:
            self.port = int(addresses[0][1])  # the real port when 0 was asked for
        if self._follow_listener:
            self.signer.base_url = self.url
        log.info("store_started", host=self.host, port=self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            # Cancelled handlers asked their files to close; a read still running in a worker
            # thread closes its file when it returns (a chunk from disk: milliseconds).
            unclosed = await self._wait_readers_closed()
            await self.targets.close()
            log.info("store_stopped", unclosed_files=unclosed)

    async def _wait_readers_closed(self) -> int:
        # Bounded as a whole: with a hung disk every worker thread may be stuck in a read, and
        # a wait queued behind them would never start.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.read_close_timeout):
                for reader in list(self._readers):
                    await asyncio.to_thread(reader.wait_closed, self.read_close_timeout)
        self._forget_closed_readers()
        if self._readers:
            log.warning(
                "store_files_left_open", files=len(self._readers), waited=self.read_close_timeout
            )
        return len(self._readers)

    @property
    def sending(self) -> int:
        """Downloads streaming a body right now (they share the read buffer budget)."""
        return self._sending

    @property
    def open_files(self) -> int:
        """Bundle descriptors of this store not closed yet (0 once stopped)."""
        self._forget_closed_readers()
        return len(self._readers)

    def _forget_closed_readers(self) -> None:
        # A reader whose close was deferred to its last read is closed later, by that thread;
        # the set holds the downloads in flight plus those few, so this stays small.
        self._readers = {r for r in self._readers if not r.closed}

    async def __aenter__(self) -> ArtifactStore:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        """Where this listener really is (loopback host and actual port)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"

    # application

    def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=1024**2)
        app.router.add_post("/v1/artifacts", self.handle_upload)
        app.router.add_get(ARTIFACT_PATH, self.handle_download, allow_head=True)
        app.router.add_put(ARTIFACT_PATH, self.handle_put)
        app.router.add_post("/v1/credentials", self.handle_credentials)
        app.router.add_get("/v1/artifacts", self.handle_list)
        app.router.add_get(ARTIFACT_PATH + "/manifest", self.handle_manifest)
        app.router.add_get("/v1/health", self.handle_health)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.monotonic()
        peer = peer_common_name(request)  # before the handler: the transport may be gone after
        response: web.StreamResponse
        try:
            response = await handler(request)
        except OtadError as exc:
            response = _error_response(exc)
            log.info(
                "request_refused",
                method=request.method,
                path=request.path,  # never the query: it may hold a signature
                status=response.status,
                code=exc.code,
                reason=exc.message,
                peer=peer,
            )
            return response
        except web.HTTPException as exc:
            return _http_error_response(exc)
        log.info(
            "request_served",
            method=request.method,
            path=request.path,
            status=response.status,
            content_length=response.content_length,
            peer=peer,
            duration_ms=round((time.monotonic() - started) * 1000, 1),
        )
        return response

    async def handle_health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    def _require_service(self, request: web.Request) -> str:
        """Catalogue reads are for the backend's own identities (operators, rollouts)."""
        peer = peer_common_name(request)
        if peer is None:
            raise AuthRequired("store: the artifact catalogue needs a service certificate")
        if not peer.startswith(SERVICE_PREFIX):
            raise AuthError(f"store: {peer} may not read the artifact catalogue")
        return peer

    async def handle_list(self, request: web.Request) -> web.Response:
        """GET /v1/artifacts: every artifact with its size and manifest (services only)."""
        self._require_service(request)
        infos = await asyncio.to_thread(self.repository.all)
        return web.json_response({"artifacts": [info.to_json() for info in infos]})

    async def handle_manifest(self, request: web.Request) -> web.Response:
        """GET /v1/artifacts/<id>/manifest: size and signed manifest (services only)."""
        self._require_service(request)
        artifact_id = check_artifact_id(request.match_info["artifact_id"])
        info = await asyncio.to_thread(self.repository.info, artifact_id)
        return web.json_response(info.to_json())

    # authorisation

    async def authorize(self, request: web.Request, artifact_id: str) -> Grant:
        """The grant this request carries for ``artifact_id``, or the precise refusal.

        Checked in this order, so the error names the first thing wrong: signature and expiry,
        the device (certificate binding), the token's artifact scope, then - for an unscoped
        token only - whether the device's desired state names this artifact.
        """
        grant = self.signer.check_presigned(request.path, artifact_id, request.query)
        auth = request.headers.get("Authorization")
        if grant is None and auth is not None:
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise AuthError("store: only Bearer authorization is accepted")
            grant = self.signer.check_token(token.strip())
        if grant is None:
            raise AuthRequired("store: a pre-signed URL or a Bearer token is required")
        self._check_binding(request, grant.device_id)
        if grant.kind == "token":
            if grant.artifact_id is None:
                await self._check_targeted(grant.device_id, artifact_id)
            elif grant.artifact_id != artifact_id:
                raise AuthWrongArtifact("store: bearer token is scoped to another artifact")
        return grant

    async def _check_targeted(self, device_id: str, artifact_id: str) -> None:
        if artifact_id not in await self.targets.targeted(device_id):
            raise ArtifactNotTargeted(
                f"store: the desired state of {device_id} does not name artifact {artifact_id}"
            )

    def _check_binding(self, request: web.Request, device_id: str) -> None:
        peer = peer_common_name(request)
        if peer is None:
            if self.config.presign_binding == "certificate":
                raise AuthRequired(
                    "store: this store requires the device's client certificate (mTLS)"
                )
            return
        if peer != device_id:
            raise AuthWrongDevice("store: credential was issued to another device")

    # handlers

    async def handle_credentials(self, request: web.Request) -> web.Response:
        device_id = peer_common_name(request)
        if device_id is None:
            raise AuthRequired("store: credentials are issued only over mTLS")
        if device_id.startswith(SERVICE_PREFIX):
            raise AuthError("store: credentials are issued to devices only")
        declared = request.content_length
        if declared is not None and declared > MAX_CREDENTIAL_REQUEST:
            raise StoreBadRequest(
                f"store: credentials request over {MAX_CREDENTIAL_REQUEST} bytes",
                reason="body_too_large",
            )
        asked = parse_credential_request(await request.read(), self.config.token_ttl)
        artifact_id, ttl = asked.artifact_id, asked.ttl
        if artifact_id is not None:
            # Targets first: a device learns nothing about artifacts that are not its own.
            await self._check_targeted(device_id, artifact_id)
            await asyncio.to_thread(self.repository.info, artifact_id)
        token, expires = self.signer.issue_token(device_id, artifact_id, ttl)
        log.info("credential_issued", device=device_id, artifact=artifact_id, ttl=ttl)
        return web.json_response(
            {
                "token": token,
                "token_type": "Bearer",
                "expires_in": ttl,
                "expires_at": expires,
                "device": device_id,
                "artifact": artifact_id,
            },
            headers={"Cache-Control": "no-store"},
        )

    async def handle_upload(self, request: web.Request) -> web.Response:
        """POST /v1/artifacts: the store names the artifact (its SHA-256)."""
        return await self._receive(request, None)

    async def handle_put(self, request: web.Request) -> web.Response:
        """PUT /v1/artifacts/<id>: idempotent; the body must hash to <id>."""
        expected = check_artifact_id(request.match_info["artifact_id"])
        return await self._receive(request, expected)

    async def _receive(self, request: web.Request, expected_id: str | None) -> web.Response:
        uploader = peer_common_name(request)
        if uploader is None:
            raise AuthRequired("store: uploads need a client certificate")
        if uploader not in self.config.uploaders:
            raise AuthError(f"store: {uploader} may not upload artifacts")
        declared = request.content_length
        if declared is not None and declared > self.config.max_upload_bytes:
            raise ArtifactRejected(
                f"store: bundle of {declared} bytes exceeds the limit", status=413
            )
        upload = await asyncio.to_thread(
            self.repository.begin, self.keyring, self.config.max_upload_bytes
        )
        try:
            async for chunk in request.content.iter_chunked(CHUNK):
                await asyncio.to_thread(upload.feed, chunk)
            info = await asyncio.to_thread(upload.commit, uploader, expected_id)
        except BaseException:
            await asyncio.to_thread(upload.abort)
            raise
        log.info(
            "artifact_uploaded",
            artifact=info.artifact_id,
            size=info.size,
            by=uploader,
            created=upload.created,
        )
        return web.json_response(
            info.to_json(),
            status=201 if upload.created or expected_id is None else 200,
            headers={"Location": ARTIFACT_PATH.format(artifact_id=info.artifact_id)},
        )

    async def handle_download(self, request: web.Request) -> web.StreamResponse:
        artifact_id = check_artifact_id(request.match_info["artifact_id"])
        grant = await self.authorize(request, artifact_id)
        info = await asyncio.to_thread(self.repository.info, artifact_id)
        headers = {
            "ETag": info.etag,
            "Last-Modified": email.utils.formatdate(int(info.mtime), usegmt=True),
            "Accept-Ranges": "bytes",
            "Cache-Control": "private, no-transform",
            "Content-Type": "application/octet-stream",
        }
        if none_match(request.headers.get("If-None-Match"), info.etag):
            return web.Response(status=304, headers=headers)
        byte_range: ByteRange | None = None
        if if_range_holds(request.headers.get("If-Range"), info.etag, headers["Last-Modified"]):
            try:
                byte_range = parse_range(request.headers.get("Range"), info.size)
            except RangeNotSatisfiable as exc:
                raise RangeNotSatisfiable(exc.message, size=info.size) from None
        response = web.StreamResponse(status=206 if byte_range else 200, headers=headers)
        start, stop = (byte_range.start, byte_range.stop) if byte_range else (0, info.size)
        if byte_range:
            response.headers["Content-Range"] = byte_range.content_range(info.size)
        response.content_length = stop - start
        log.debug("download_started", artifact=artifact_id, device=grant.device_id, start=start)
        if request.method == "HEAD":
            await response.prepare(request)
            return response
        reader = await asyncio.to_thread(self.repository.open, info)
        self._readers.add(reader)
        try:
            await response.prepare(request)
            sent = await self._send(response, reader, start, stop)
        finally:
            reader.close()  # deferred to the read in flight, if any: never blocks, never races
            self._forget_closed_readers()
        if sent < stop - start:
            # The client went away (a device losing its link resumes with Range later).
            log.info(
                "download_interrupted",
                artifact=artifact_id,
                device=grant.device_id,
                sent=sent,
                expected=stop - start,
            )
            return response
        # Every byte was handed over; a client that left before the last flush is not an error.
        with contextlib.suppress(ConnectionError):
            await response.write_eof()
        return response

    async def _send(
        self, response: web.StreamResponse, reader: BundleReader, start: int, stop: int
    ) -> int:
        """Stream [start, stop) of ``reader``; the next chunk is read while this one is sent.

        Returns the bytes handed to the transport; fewer than asked when the client is gone.
        A cancellation (server stopping) leaves at most one read running in a worker thread;
        the reader keeps its descriptor open until that read returns.
        """
        loop = asyncio.get_running_loop()
        budget = self.config.download_buffer_bytes

        def read_at(at: int) -> asyncio.Future[bytes]:
            # Decided per read: a download adapts as others start and end.
            chunk = chunk_for(self._sending, budget, self.chunk_size)
            return loop.run_in_executor(None, reader.read, at, min(chunk, stop - at))

        self._sending += 1
        offset = start
        pending: asyncio.Future[bytes] | None = read_at(offset) if offset < stop else None
        try:
            while pending is not None:
                data = await pending
                if not data:
                    raise StoreError("store: artifact shrank while being sent")
                following = offset + len(data)
                pending = read_at(following) if following < stop else None
                try:
                    await response.write(data)
                except ConnectionError:
                    # Reset while writing, or "Connection lost" from the drain waiter: aiohttp
                    # raises either, depending on where the peer's reset is noticed.
                    return offset - start
                offset = following
            return offset - start
        finally:
            self._sending -= 1
            if pending is not None:
                _abandon(pending)
