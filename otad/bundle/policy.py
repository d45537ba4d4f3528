"""What a verifier accepts beyond a valid signature: hardware, anti-rollback, expiry, device."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from otad.bundle.keys import ALGORITHMS
from otad.bundle.manifest import Manifest, format_timestamp
from otad.errors import ConfigError, Downgrade, Expired, Incompatible, Oversize, WrongDevice

__layer__ = "pure"


@dataclass(frozen=True, slots=True)
class VerifyPolicy:
    """Checks applied to a manifest once its signature is valid.

    A field left at ``None`` is not checked; the device agent sets all of them. ``now`` defaults
    to the clock at verification time. ``max_image_size`` lets a device refuse an image larger
    than its slot before writing a byte.
    """

    compatible: str | None = None
    min_security_version: int = 0
    device_id: str | None = None
    now: datetime | None = None
    algorithms: frozenset[str] = field(default_factory=lambda: frozenset(ALGORITHMS))
    max_image_size: int | None = None

    def __post_init__(self) -> None:
        if self.min_security_version < 0:
            raise ConfigError("bundle: min_security_version must be >= 0")
        if self.now is not None and self.now.tzinfo is None:
            raise ConfigError("bundle: the policy's now must be timezone-aware")
        unknown = self.algorithms - set(ALGORITHMS)
        if unknown:
            raise ConfigError(f"bundle: unknown signature algorithms {sorted(unknown)}")

    def check(self, manifest: Manifest) -> None:
        """Raise the error naming the first rule ``manifest`` breaks."""
        if self.compatible is not None and manifest.compatible != self.compatible:
            raise Incompatible(
                f"bundle: built for {manifest.compatible!r}, this device is {self.compatible!r}",
                bundle=manifest.compatible,
                device=self.compatible,
            )
        if manifest.security_version < self.min_security_version:
            raise Downgrade(
                f"bundle: security_version {manifest.security_version} is below the floor "
                f"{self.min_security_version}",
                security_version=manifest.security_version,
                floor=self.min_security_version,
            )
        if manifest.expires is not None:
            now = self.now if self.now is not None else datetime.now(UTC)
            if now >= manifest.expires:
                raise Expired(
                    f"bundle: expired at {format_timestamp(manifest.expires)}",
                    expires=format_timestamp(manifest.expires),
                )
        if (
            manifest.device is not None
            and self.device_id is not None
            and manifest.device != self.device_id
        ):
            raise WrongDevice(
                f"bundle: bound to device {manifest.device!r}, this is {self.device_id!r}",
                bundle=manifest.device,
                device=self.device_id,
            )
        if self.max_image_size is not None and manifest.image_size > self.max_image_size:
            raise Oversize(
                f"bundle: image of {manifest.image_size} bytes exceeds the limit of "
                f"{self.max_image_size}",
                image_size=manifest.image_size,
                limit=self.max_image_size,
            )
