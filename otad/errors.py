"""The one exception tree of otad.

Every error carries a stable wire ``code`` (lower_snake, reported on the shadow as
``error.code`` and printed by the CLI) and a ``retryable`` flag (may the same step succeed if it
is simply tried again later?). Third-party errors (aiohttp, aiomqtt, OSError) are translated into
this tree once, at the adapter edge, keeping the cause with ``raise ... from exc``.

::

    OtadError                          internal
    ├── ConfigError                    config_invalid
    ├── BundleError                    bundle_invalid
    │   ├── MalformedHeader            bundle_malformed_header
    │   ├── UnsupportedFormat          bundle_unsupported_format
    │   ├── MalformedManifest          bundle_malformed_manifest
    │   ├── BadSignature               bundle_bad_signature
    │   ├── UnknownKey                 bundle_unknown_key
    │   ├── RevokedKey                 bundle_revoked_key
    │   ├── AlgorithmNotAllowed        bundle_algorithm_not_allowed
    │   ├── Incompatible               bundle_incompatible
    │   ├── Downgrade                  bundle_downgrade
    │   ├── Expired                    bundle_expired
    │   ├── WrongDevice                bundle_wrong_device
    │   ├── Truncated                  bundle_truncated
    │   ├── Oversize                   bundle_oversize
    │   ├── DecompressFailed           bundle_decompress_failed
    │   ├── PayloadHashMismatch        bundle_payload_hash_mismatch
    │   └── ImageHashMismatch          bundle_image_hash_mismatch
    ├── KeyringError                   keyring_invalid
    ├── ShadowError                    shadow_error            (has an HTTP-like ``status``)
    │   ├── ShadowBadRequest           shadow_bad_request      400
    │   ├── ShadowUnauthorized         shadow_unauthorized     401
    │   ├── ShadowForbidden            shadow_forbidden        403
    │   ├── ShadowNotFound             shadow_not_found        404
    │   ├── ShadowVersionConflict      shadow_version_conflict 409
    │   ├── ShadowTooLarge             shadow_too_large        413
    │   ├── ShadowUnsupportedEncoding  shadow_unsupported      415
    │   ├── ShadowThrottled            shadow_throttled        429  retryable
    │   └── ShadowInternal             shadow_internal         500  retryable
    ├── DesiredStateInvalid            desired_invalid
    ├── DownloadError                  download_failed         retryable
    │   ├── InsecureUrl                download_insecure_url
    │   ├── UrlExpired                 download_url_expired    (needs a fresh URL, not a retry)
    │   ├── DownloadForbidden          download_forbidden
    │   ├── DownloadNotFound           download_not_found
    │   ├── DownloadTimeout            download_timeout        retryable
    │   ├── DownloadProtocolError      download_protocol_error retryable
    │   ├── DownloadTooLarge           download_too_large
    │   └── RetriesExhausted           download_retries_exhausted
    ├── SlotError                      slot_error
    │   ├── BootedSlotWrite            slot_is_booted
    │   ├── SlotNotFound               slot_not_found
    │   ├── SlotTooSmall               slot_too_small
    │   ├── SlotWriteFailed            slot_write_failed
    │   ├── NoSpace                    no_space
    │   └── SlotVerifyFailed           slot_verify_failed
    ├── BootloaderError                bootloader_error
    │   ├── BootloaderEnvCorrupt       bootloader_env_corrupt
    │   └── MarkRefused                mark_refused
    ├── JournalError                   journal_error
    │   ├── JournalCorrupt             journal_corrupt
    │   └── AgentLocked                agent_locked
    ├── JobError                       job_error
    │   ├── JobCancelled               job_cancelled
    │   ├── TransitionError            invalid_transition      (a bug: unknown (state, event))
    │   ├── RebootLoop                 reboot_loop
    │   ├── RebootFailed               reboot_failed           (the reboot command failed or hung)
    │   ├── HealthCheckFailed          health_check_failed
    │   └── BootFailed                 boot_failed
    ├── BrokerError                    broker_unavailable      retryable
    ├── StoreError                     store_error
    │   ├── ArtifactNotFound           artifact_not_found
    │   ├── AuthError                  auth_failed
    │   │   ├── AuthRequired           auth_required
    │   │   ├── AuthExpired            auth_expired            (needs a fresh URL/token)
    │   │   ├── AuthWrongDevice        auth_wrong_device       (credential of another device)
    │   │   ├── AuthWrongArtifact      auth_wrong_artifact     (token scoped to another artifact)
    │   │   └── ArtifactNotTargeted    artifact_not_targeted   (not in the device's desired state)
    │   ├── ArtifactRejected           artifact_rejected
    │   ├── RangeNotSatisfiable        range_not_satisfiable
    │   └── StoreBadRequest            store_bad_request
    └── RolloutError                   rollout_error

Messages name the layer and the thing (``grub: cannot write grubenv at /boot/grubenv: ...``)
and never contain a secret (no pre-signed query string, no token).
"""

from __future__ import annotations

from typing import Any, ClassVar

__layer__ = "pure"


class OtadError(Exception):
    """Base of every error otad raises on purpose."""

    code: ClassVar[str] = "internal"
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_wire(self) -> dict[str, str]:
        """The ``error`` object reported on the shadow."""
        return {"code": self.code, "message": self.message}

    def __str__(self) -> str:
        return self.message


# --- configuration -------------------------------------------------------------------------


class ConfigError(OtadError):
    code = "config_invalid"


# --- bundles ---------------------------------------------------------------------------------


class BundleError(OtadError):
    code = "bundle_invalid"


class MalformedHeader(BundleError):
    code = "bundle_malformed_header"


class UnsupportedFormat(BundleError):
    code = "bundle_unsupported_format"


class MalformedManifest(BundleError):
    code = "bundle_malformed_manifest"


class BadSignature(BundleError):
    code = "bundle_bad_signature"


class UnknownKey(BundleError):
    code = "bundle_unknown_key"


class RevokedKey(BundleError):
    code = "bundle_revoked_key"


class AlgorithmNotAllowed(BundleError):
    code = "bundle_algorithm_not_allowed"


class Incompatible(BundleError):
    code = "bundle_incompatible"


class Downgrade(BundleError):
    code = "bundle_downgrade"


class Expired(BundleError):
    code = "bundle_expired"


class WrongDevice(BundleError):
    code = "bundle_wrong_device"


class Truncated(BundleError):
    code = "bundle_truncated"


class Oversize(BundleError):
    code = "bundle_oversize"


class DecompressFailed(BundleError):
    code = "bundle_decompress_failed"


class PayloadHashMismatch(BundleError):
    code = "bundle_payload_hash_mismatch"


class ImageHashMismatch(BundleError):
    code = "bundle_image_hash_mismatch"


class KeyringError(OtadError):
    code = "keyring_invalid"


# --- shadow protocol ---------------------------------------------------------------------------


class ShadowError(OtadError):
    code = "shadow_error"
    status: ClassVar[int] = 400


class ShadowBadRequest(ShadowError):
    code = "shadow_bad_request"
    status = 400


class ShadowUnauthorized(ShadowError):
    code = "shadow_unauthorized"
    status = 401


class ShadowForbidden(ShadowError):
    code = "shadow_forbidden"
    status = 403


class ShadowNotFound(ShadowError):
    code = "shadow_not_found"
    status = 404


class ShadowVersionConflict(ShadowError):
    code = "shadow_version_conflict"
    status = 409


class ShadowTooLarge(ShadowError):
    code = "shadow_too_large"
    status = 413


class ShadowUnsupportedEncoding(ShadowError):
    code = "shadow_unsupported"
    status = 415


class ShadowThrottled(ShadowError):
    code = "shadow_throttled"
    status = 429
    retryable = True


class ShadowInternal(ShadowError):
    code = "shadow_internal"
    status = 500
    retryable = True


class DesiredStateInvalid(OtadError):
    """The desired ``software`` entry is not something a device can act on."""

    code = "desired_invalid"


# --- downloads ---------------------------------------------------------------------------------


class DownloadError(OtadError):
    code = "download_failed"
    retryable = True


class InsecureUrl(DownloadError):
    code = "download_insecure_url"
    retryable = False


class UrlExpired(DownloadError):
    """The pre-signed URL or token is no longer accepted; a fresh one is needed."""

    code = "download_url_expired"
    retryable = False


class DownloadForbidden(DownloadError):
    code = "download_forbidden"
    retryable = False


class DownloadNotFound(DownloadError):
    code = "download_not_found"
    retryable = False


class DownloadTimeout(DownloadError):
    code = "download_timeout"
    retryable = True


class DownloadProtocolError(DownloadError):
    code = "download_protocol_error"
    retryable = True


class DownloadTooLarge(DownloadError):
    code = "download_too_large"
    retryable = False


class RetriesExhausted(DownloadError):
    code = "download_retries_exhausted"
    retryable = False


# --- slots -------------------------------------------------------------------------------------


class SlotError(OtadError):
    code = "slot_error"


class BootedSlotWrite(SlotError):
    code = "slot_is_booted"


class SlotNotFound(SlotError):
    code = "slot_not_found"


class SlotTooSmall(SlotError):
    code = "slot_too_small"


class SlotWriteFailed(SlotError):
    code = "slot_write_failed"


class NoSpace(SlotError):
    code = "no_space"


class SlotVerifyFailed(SlotError):
    code = "slot_verify_failed"


# --- bootloader --------------------------------------------------------------------------------


class BootloaderError(OtadError):
    code = "bootloader_error"


class BootloaderEnvCorrupt(BootloaderError):
    code = "bootloader_env_corrupt"


class MarkRefused(BootloaderError):
    """A local mark that would confirm an unverified slot or leave no slot to boot."""

    code = "mark_refused"


# --- journal -----------------------------------------------------------------------------------


class JournalError(OtadError):
    code = "journal_error"


class JournalCorrupt(JournalError):
    code = "journal_corrupt"


class AgentLocked(JournalError):
    """Another agent already holds the data directory."""

    code = "agent_locked"


# --- jobs --------------------------------------------------------------------------------------


class JobError(OtadError):
    code = "job_error"


class JobCancelled(JobError):
    code = "job_cancelled"


class TransitionError(JobError):
    """An unknown (state, event) pair: a bug, never silently ignored."""

    code = "invalid_transition"


class RebootLoop(JobError):
    code = "reboot_loop"


class RebootFailed(JobError):
    """The reboot command failed, or the system was still up long after it succeeded."""

    code = "reboot_failed"


class HealthCheckFailed(JobError):
    code = "health_check_failed"


class BootFailed(JobError):
    code = "boot_failed"


# --- cloud -------------------------------------------------------------------------------------


class BrokerError(OtadError):
    code = "broker_unavailable"
    retryable = True


class StoreError(OtadError):
    code = "store_error"


class ArtifactNotFound(StoreError):
    code = "artifact_not_found"


class AuthError(StoreError):
    code = "auth_failed"


class AuthRequired(AuthError):
    code = "auth_required"


class AuthExpired(AuthError):
    """The pre-signed URL or token is past its expiry; a fresh one is needed."""

    code = "auth_expired"


class AuthWrongDevice(AuthError):
    """A valid URL or token, presented over mTLS by a device it was not issued to."""

    code = "auth_wrong_device"


class AuthWrongArtifact(AuthError):
    """A valid token scoped to one artifact, presented for another."""

    code = "auth_wrong_artifact"


class ArtifactNotTargeted(AuthError):
    """The device's desired state does not name this artifact, so no credential opens it."""

    code = "artifact_not_targeted"


class ArtifactRejected(StoreError):
    code = "artifact_rejected"


class RangeNotSatisfiable(StoreError):
    code = "range_not_satisfiable"


class StoreBadRequest(StoreError):
    code = "store_bad_request"


class RolloutError(OtadError):
    code = "rollout_error"


def all_error_classes() -> list[type[OtadError]]:
    """Every class of the tree, base first (used by the docs and the code-uniqueness test)."""
    seen: list[type[OtadError]] = []
    stack: list[type[OtadError]] = [OtadError]
    while stack:
        cls = stack.pop(0)
        seen.append(cls)
        stack.extend(cls.__subclasses__())
    return seen
