"""HTTPS bundle downloads: verified TLS, Range resume, bounded retries.

A :class:`Transfer` is one bundle being fetched. Its :meth:`Transfer.chunks` yields
``(offset, bytes)`` pairs; after a cut it reconnects with ``Range: bytes=<offset>-`` and
``If-Range: <ETag>`` and goes on where it stopped, so no byte is fetched twice. A server that
answers a resume with ``200`` (it ignored Range, or the entity changed) makes the transfer start
again at offset 0; the caller sees the offset jump back and resets what it built so far.

Requests go through :mod:`otad.agent.httpclient` (one TLS connection per request). Every
TLS / OS error is translated here, once, into the
:class:`~otad.errors.DownloadError` tree. A pre-signed URL that is refused (401/403) is
:class:`~otad.errors.UrlExpired`: the caller asks for a fresh URL, calls
:meth:`Transfer.replace_source`, iterates again, and the transfer resumes at the same offset.
URLs are logged without their query; tokens never.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import structlog

from otad.agent.config import AgentConfig, DownloadConfig
from otad.agent.httpclient import Response, request
from otad.errors import (
    DownloadError,
    DownloadForbidden,
    DownloadNotFound,
    DownloadProtocolError,
    DownloadTimeout,
    DownloadTooLarge,
    InsecureUrl,
    Oversize,
    RetriesExhausted,
    Truncated,
    UrlExpired,
)
from otad.logs import redact_text, redact_url

__layer__ = "adapter"

log = structlog.get_logger(__name__)

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_UNSATISFIED_RANGE = re.compile(r"^bytes \*/(\d+)$")
_MAX_REDIRECTS = 5
_RETRY_AFTER_CAP = 60.0
_ALIVE_EVERY = 5.0  # seconds between ``alive`` calls while a retry waits
_MAX_JSON = 64 * 1024  # a credential answer is a few hundred bytes


@dataclass(frozen=True)
class Source:
    """Where a bundle comes from: a pre-signed https URL, or an artifact URL plus token auth."""

    url: str
    auth: str | None = None  # None: pre-signed URL; "token": temporary credential flow

    def __post_init__(self) -> None:
        check_https(self.url)

    @property
    def safe(self) -> str:
        return redact_url(self.url)


def check_https(url: str) -> None:
    """Raise :class:`InsecureUrl` unless ``url`` is an absolute ``https://`` URL with a host."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise InsecureUrl(f"download: not a URL: {redact_url(url)}") from exc
    if parts.scheme.lower() != "https" or not parts.hostname:
        raise InsecureUrl(
            f"download: only https:// URLs are accepted, got {parts.scheme or 'no'} scheme"
        )


def backoff_delay(attempt: int, initial: float, maximum: float) -> float:
    """Exponential backoff with jitter (50-100 % of the capped step); ``attempt`` from 1."""
    step = min(maximum, initial * (2 ** max(0, attempt - 1)))
    return float(step * random.uniform(0.5, 1.0))


def make_ssl_context(
    ca: Any = None, cert: tuple[Any, Any] | None = None, *, what: str = "download"
) -> ssl.SSLContext:
    """A verifying client context for ``ca`` (system store when None), optional client cert."""
    try:
        ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
        if cert is not None:
            ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    except (OSError, ssl.SSLError) as exc:
        raise DownloadForbidden(f"{what}: cannot load TLS material: {exc}") from exc
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class Downloader:
    """Owns the TLS context, the open responses and the credential for token auth."""

    def __init__(self, config: AgentConfig, *, tls: ssl.SSLContext | None = None) -> None:
        """``tls``: a context made by :func:`make_ssl_context` to share (else made here)."""
        self.config = config
        self.settings: DownloadConfig = config.download
        self._ssl = tls or make_ssl_context(config.store_ca, config.store_cert)
        self._open: set[Response] = set()
        self._token: str | None = None
        self._token_deadline = 0.0
        self._token_artifact: str | None = None

    async def open(
        self, method: str, url: str, headers: dict[str, str], body: bytes | None = None
    ) -> Response:
        """One request on a fresh connection (no pool a server could poison by writing past
        its Content-Length onto a kept-alive connection); close the response when done."""
        response = await request(
            method,
            url,
            headers=headers,
            body=body,
            ssl_context=self._ssl,
            connect_timeout=self.settings.sock_connect,
            read_timeout=self.settings.sock_read,
            buffer_size=max(self.settings.chunk_size, self.settings.block_size),
        )
        self._open.add(response)
        return response

    async def release(self, response: Response) -> None:
        self._open.discard(response)
        await response.close()

    async def close(self) -> None:
        """Cut whatever is still open; best effort, never raises (runs on the way out of a stop)."""
        responses, self._open = self._open, set()
        for response in responses:
            try:
                await response.close()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("download_close_failed", error=f"{type(exc).__name__}: {exc}")

    def transfer(
        self,
        source: Source,
        *,
        max_size: int | None = None,
        alive: Callable[[], object] | None = None,
    ) -> Transfer:
        limit = self.settings.max_bundle_size
        if max_size is not None:
            limit = min(limit, max_size)
        return Transfer(self, source, limit, alive)

    def forget_token(self) -> None:
        self._token = None

    async def token(self, source: Source) -> str:
        """A temporary credential from ``POST <store>/v1/credentials`` (cert = proof)."""
        artifact = urlsplit(source.url).path.rsplit("/", 1)[-1]
        fresh = time.monotonic() < self._token_deadline and self._token_artifact == artifact
        if self._token is not None and fresh:
            return self._token
        base = self.config.store.url or _origin(source.url)
        url = f"{base}/v1/credentials"
        check_https(url)
        payload = json.dumps({"artifact": artifact}).encode()
        try:
            resp = await self.open(
                "POST",
                url,
                {"Content-Type": "application/json", "Accept": "application/json"},
                payload,
            )
            try:
                if resp.status in (401, 403):
                    raise DownloadForbidden(
                        f"download: credential request refused ({resp.status})",
                        status=resp.status,
                    )
                if resp.status == 404:
                    raise DownloadNotFound("download: the store knows no such artifact", status=404)
                if resp.status != 200:
                    raise DownloadProtocolError(
                        f"download: credential request answered {resp.status}", status=resp.status
                    )
                body = json.loads(await resp.read(_MAX_JSON))
            finally:
                await self.release(resp)
        except DownloadError:
            raise
        except Exception as exc:
            raise _translate(exc, "credential request") from exc
        token = body.get("token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise DownloadProtocolError("download: credential answer has no token")
        lifetime = body.get("expires_in", 300)
        lifetime = float(lifetime) if isinstance(lifetime, int | float) else 300.0
        self._token = token
        self._token_artifact = artifact
        # Renew a little early so a long download does not hit the edge of the token's life.
        self._token_deadline = time.monotonic() + max(1.0, lifetime * 0.8)
        log.info("credential_obtained", store=redact_url(base), expires_in=lifetime)
        return token


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def same_origin(a: str, b: str) -> bool:
    """Do two URLs share scheme, host and port (RFC 6454)? Unparseable counts as different."""
    try:
        pa, pb = urlsplit(a), urlsplit(b)
        key_a = (pa.scheme.lower(), pa.hostname, pa.port or 443)
        key_b = (pb.scheme.lower(), pb.hostname, pb.port or 443)
    except ValueError:
        return False
    return key_a == key_b


def _translate(exc: BaseException, what: str) -> DownloadError:
    """The one place where TLS / OS / parsing errors become otad errors."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return DownloadForbidden(f"download: {what}: server certificate not trusted")
    if isinstance(exc, TimeoutError):
        return DownloadTimeout(f"download: {what}: timed out")
    if isinstance(exc, ValueError):  # e.g. a JSON answer that is not JSON
        return DownloadProtocolError(f"download: {what}: invalid answer ({type(exc).__name__})")
    if isinstance(exc, OSError | ssl.SSLError):
        # the text may quote the URL: never its query
        return DownloadProtocolError(
            f"download: {what}: {type(exc).__name__}: {redact_text(str(exc))}"
        )
    return DownloadProtocolError(f"download: {what}: {type(exc).__name__}")


class Transfer:
    """One bundle fetch, resumable within the process."""

    def __init__(
        self,
        downloader: Downloader,
        source: Source,
        max_size: int,
        alive: Callable[[], object] | None = None,
    ) -> None:
        self.downloader = downloader
        # called while retries wait: a bounded retry sequence is work going on, not a hang,
        # and may outlast the watchdog's stall limit (retries x (timeout + backoff))
        self.alive: Callable[[], object] = alive or (lambda: None)
        self.source = source
        self.max_size = max_size
        self._cap = max_size  # before limit(): what a new entity after a restart may have
        self.offset = 0
        self.total: int | None = None
        self.etag: str | None = None
        self.restarts = 0
        self.resumes = 0
        self.requests = 0
        self.bytes_received = 0
        self._token_refused = False
        # the min_rate window: (start, bytes since). It spans responses, so a server that
        # answers each range with a few bytes is as slow as one that trickles them
        self._window: tuple[float, int] | None = None

    def replace_source(self, source: Source) -> None:
        """A fresh URL for the same artifact (after :class:`UrlExpired`); the offset is kept."""
        self.source = source
        self.downloader.forget_token()

    def limit(self, size: int) -> None:
        """The size the verified bundle header declares: the byte limit, and the length the
        download has to reach."""
        if size > self._cap:
            raise DownloadTooLarge(f"download: bundle declares {size} bytes, limit is {self._cap}")
        if self.total is not None and self.total < size:
            raise Truncated(
                f"bundle: the server has {self.total} bytes, the bundle header declares {size}"
            )
        if self.total is not None and self.total > size:
            raise Oversize(
                f"bundle: the server has {self.total} bytes, the bundle header declares {size}"
            )
        self.max_size = size
        # a body without a length ends when the server closes, and a cut close can look clean:
        # the size the signed header declares tells whether the whole bundle arrived
        self.total = size

    async def chunks(self) -> AsyncIterator[tuple[int, bytes]]:
        """Yield ``(offset, data)`` until the whole entity arrived; retry transient errors."""
        cfg = self.downloader.settings
        failures = 0
        reached = self.offset
        self._window = None  # a new call (after a fresh URL, say) starts a new window
        while self.total is None or self.offset < self.total:
            try:
                async for item in self._request():
                    yield item
            except DownloadError as exc:
                if not exc.retryable:
                    raise
                self._window = None  # the backoff is ours: the next try's rate starts afresh
                # Progress past the furthest offset reached so far earns a fresh retry budget;
                # a server that cuts every connection before sending anything, or makes us
                # start over and cuts at the same place again, still runs out of retries.
                if self.offset - reached >= cfg.chunk_size:
                    failures = 0
                reached = max(reached, self.offset)
                failures += 1
                if failures > cfg.retries:
                    raise RetriesExhausted(
                        f"download: gave up after {cfg.retries} retries: {exc}", cause=exc.code
                    ) from exc
                delay = exc.details.get("retry_after") or backoff_delay(
                    failures, cfg.backoff_initial, cfg.backoff_max
                )
                log.warning(
                    "download_retrying",
                    url=self.source.safe,
                    offset=self.offset,
                    attempt=failures,
                    delay=round(delay, 2),
                    error=exc.code,
                    reason=exc.message,
                )
                await self._wait(delay)

    async def _wait(self, delay: float) -> None:
        """Sleep ``delay`` seconds, saying ``alive`` at least every few seconds."""
        deadline = time.monotonic() + delay
        while (left := deadline - time.monotonic()) > 0:
            self.alive()
            await asyncio.sleep(min(left, _ALIVE_EVERY))
        self.alive()

    def _headers(self) -> dict[str, str]:
        headers = {"Accept-Encoding": "identity"}
        if self.offset > 0:
            headers["Range"] = f"bytes={self.offset}-"
            if self.etag and not self.etag.startswith("W/"):
                # only a strong tag may go in If-Range (RFC 9110 13.1.5): a server compares it
                # strongly and would send the whole entity every time. With a weak one the
                # 206's ETag is compared instead (_body)
                headers["If-Range"] = self.etag
        return headers

    def _start_over(self, why: str) -> DownloadProtocolError:
        """The bytes we hold may be of another entity: the next request starts at byte 0."""
        self._forget_entity(why)
        return DownloadProtocolError(f"download: {why}; restarting from the first byte")

    def _forget_entity(self, why: str) -> None:
        log.warning("download_restarted", url=self.source.safe, had=self.offset, reason=why)
        self.offset, self.etag, self.total, self.max_size = 0, None, None, self._cap
        self.restarts += 1

    async def _request(self) -> AsyncIterator[tuple[int, bytes]]:
        downloader = self.downloader
        url = self.source.url
        headers = self._headers()
        if self.source.auth == "token":
            headers["Authorization"] = f"Bearer {await downloader.token(self.source)}"
        self.requests += 1
        if self.offset > 0:
            self.resumes += 1
            log.info("download_resumed", url=self.source.safe, offset=self.offset)
        try:
            for _ in range(_MAX_REDIRECTS + 1):
                resp = await downloader.open("GET", url, headers)
                try:
                    if resp.status in (301, 302, 303, 307, 308):
                        location = resp.headers.get("Location", "")
                        target = urljoin(url, location)
                        check_https(target)
                        if "Authorization" in headers and not same_origin(url, target):
                            # the store's credential is for the store: a mirror or CDN the
                            # redirect names must not see it (a pre-signed target needs none)
                            del headers["Authorization"]
                            log.info("download_redirect_unauthorised", to=_origin(target))
                        url = target
                        continue
                    if self._complete_already(resp):
                        return
                    self._check_status(resp)
                    async for item in self._body(resp):
                        yield item
                    return
                finally:
                    await downloader.release(resp)
            raise DownloadProtocolError("download: too many redirects")
        except DownloadError:
            raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise _translate(exc, "transfer") from exc

    def _complete_already(self, resp: Response) -> bool:
        """A 416 naming our offset as the entity's length: every byte is here already (the cut
        came after the last one, e.g. in a chunked body's trailer)."""
        if resp.status != 416 or self.offset == 0 or self.total not in (None, self.offset):
            return False  # a length other than the one the bundle header declares: start over
        match = _UNSATISFIED_RANGE.match((resp.headers.get("Content-Range") or "").strip())
        if match is None or int(match.group(1)) != self.offset:
            return False
        self.total = self.offset
        return True

    def _check_status(self, resp: Response) -> None:
        status = resp.status
        if status in (200, 206):
            self._token_refused = False
            return
        if status in (401, 403):
            if self.source.auth == "token":
                # The token may have just expired: drop it and retry once with a fresh one.
                self.downloader.forget_token()
                if not self._token_refused:
                    self._token_refused = True
                    raise DownloadProtocolError(
                        f"download: token refused ({status})", status=status
                    )
                raise DownloadForbidden(
                    f"download: access refused with a fresh token ({status})", status=status
                )
            raise UrlExpired(
                f"download: pre-signed URL refused ({status}); a fresh URL is needed",
                status=status,
            )
        if status in (404, 410):
            raise DownloadNotFound(f"download: artifact not found ({status})", status=status)
        if status == 416:
            # Our offset is past the entity (it changed under us)
            raise self._start_over("range not satisfiable")
        if status in (408, 425, 429) or status >= 500:
            retry_after = _retry_after(resp.headers.get("Retry-After"))
            raise DownloadProtocolError(
                f"download: server answered {status}", status=status, retry_after=retry_after
            )
        raise DownloadForbidden(f"download: server answered {status}", status=status)

    async def _body(self, resp: Response) -> AsyncIterator[tuple[int, bytes]]:
        etag = resp.headers.get("ETag")
        if resp.status == 200:
            length = resp.content_length
            if self.offset > 0:
                # Range ignored or If-Range did not match: the bytes we hold may be of another
                # entity, so the caller must start over from the first byte.
                self._forget_entity("the server sent the whole entity")
            start = 0
            total = length
            stop = total
        else:
            start, last, total = self._content_range(resp.headers.get("Content-Range") or "")
            stop = last + 1
            if resp.content_length is not None and resp.content_length != stop - start:
                raise DownloadProtocolError(
                    f"download: 206 of {resp.content_length} bytes for range {start}-{last}"
                )
            # A strong tag was checked by If-Range already (an answer without one is fine); a
            # weak one must come back on the 206, or nothing says the bytes continue ours.
            stored = self.etag
            if (
                stored
                and (etag or stored.startswith("W/"))
                and _opaque(etag or "") != _opaque(stored)
            ):
                raise self._start_over("ETag changed on resume")
            if total is not None and self.total is not None and total != self.total:
                raise self._start_over("entity length changed on resume")
        if total is not None:
            if total > self.max_size:
                raise DownloadTooLarge(
                    f"download: server declares {total} bytes, limit is {self.max_size}"
                )
            self.total = total
        if etag:
            self.etag = etag
        offset = start
        cfg = self.downloader.settings
        if self._window is None:
            self._window = (time.monotonic(), 0)
        # whole disk blocks straight from the receive buffer: the pump hands them on as they
        # are (no joining of small pieces, one copy from the TLS layer to the disk thread)
        async for data in resp.chunks(max(cfg.chunk_size, cfg.block_size)):
            end = offset + len(data)
            limit = self.total if self.total is not None else self.max_size
            if end > limit or end > self.max_size:
                raise DownloadTooLarge(
                    f"download: server sent more than the {limit} bytes declared"
                )
            if stop is not None and end > stop:
                raise DownloadProtocolError(
                    f"download: server sent more than the range it declared (up to {stop})"
                )
            self.bytes_received += len(data)
            yield offset, data
            offset = end
            self.offset = end
            if cfg.min_rate:
                self._check_rate(len(data))
        if stop is not None and offset < stop:
            raise DownloadProtocolError(
                f"download: body ended at {offset} of {stop} bytes", offset=offset
            )
        if stop is None:  # a 200 without a length: it ends when the server closes
            if not resp.complete:
                raise DownloadProtocolError(
                    f"download: connection lost at {offset} bytes", offset=offset
                )
            if self.total is not None and offset < self.total:
                # a close that looks clean can still be a cut: the bundle header said more
                raise DownloadProtocolError(
                    f"download: body ended at {offset} of {self.total} bytes", offset=offset
                )
            if self.total is None:
                self.total = offset  # nothing declared a length: the clean close ends it

    def _check_rate(self, got: int) -> None:
        cfg = self.downloader.settings
        assert self._window is not None
        since, window_bytes = self._window
        window_bytes += got
        now = time.monotonic()
        if now - since < cfg.rate_window:
            self._window = (since, window_bytes)
        elif window_bytes / (now - since) < cfg.min_rate:
            self._window = None
            raise DownloadTimeout(f"download: below the minimum rate of {cfg.min_rate} B/s")
        else:
            self._window = (now, 0)

    def _content_range(self, value: str) -> tuple[int, int, int | None]:
        match = _CONTENT_RANGE.match(value.strip())
        if match is None:
            raise DownloadProtocolError("download: 206 without a valid Content-Range")
        start, end = int(match.group(1)), int(match.group(2))
        total = None if match.group(3) == "*" else int(match.group(3))
        if start != self.offset or end < start or (total is not None and end >= total):
            raise DownloadProtocolError(
                f"download: Content-Range {start}-{end} does not continue at {self.offset}"
            )
        return start, end, total


def _opaque(etag: str) -> str:
    """The tag without its weakness flag: ETags compared the weak way (RFC 9110 8.8.3.2)."""
    return etag.removeprefix("W/")


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return min(_RETRY_AFTER_CAP, max(0.0, float(value)))
    except ValueError:
        return None
