"""The set of public keys a device trusts, and the ids it has revoked.

On disk a keyring is a directory of ``<key id>.pem`` public keys plus an optional ``revoked``
file (one key id per line, ``#`` starts a comment). The file name must equal the key id computed
from the key (:attr:`otad.bundle.keys.PublicKey.key_id`): a renamed or swapped file is refused
at load time instead of silently trusting a key under the wrong name. A single PEM file is also
accepted as a one-key keyring. Rotation: add the new key's file, sign with both keys for a
while, then list the old id in ``revoked``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Final

from otad.bundle.keys import PublicKey, as_public_key, load_public_key
from otad.errors import KeyringError, RevokedKey, UnknownKey

if TYPE_CHECKING:
    from otad.bundle.signing import CryptographyKey

__layer__ = "pure"

REVOKED_FILE: Final = "revoked"
_KEY_ID = re.compile(r"[0-9a-f]{16}")


class Keyring:
    """Trusted public keys by key id, plus revoked key ids (which win over trust)."""

    def __init__(
        self, keys: Mapping[str, PublicKey | CryptographyKey], revoked: Iterable[str] = ()
    ) -> None:
        self._keys = {key_id: as_public_key(key) for key_id, key in keys.items()}
        for key_id, key in self._keys.items():
            if key.key_id != key_id:
                raise KeyringError(f"bundle: key id {key_id} does not match its key")
        self.revoked = frozenset(revoked)

    @classmethod
    def from_keys(
        cls, keys: Iterable[PublicKey | CryptographyKey], revoked: Iterable[str] = ()
    ) -> Keyring:
        public = [as_public_key(k) for k in keys]
        return cls({k.key_id: k for k in public}, revoked)

    @classmethod
    def load(cls, path: Path) -> Keyring:
        """Load a keyring directory or a single PEM public key file."""
        if path.is_file():
            return cls.from_keys([load_public_key(path)])
        if not path.is_dir():
            raise KeyringError(f"bundle: keyring {path} is neither a directory nor a PEM file")
        keys: dict[str, PublicKey] = {}
        for pem in sorted(path.glob("*.pem")):
            key = load_public_key(pem)
            key_id = key.key_id
            if pem.stem != key_id:
                raise KeyringError(
                    f"bundle: keyring file {pem.name} holds key {key_id}; rename it to {key_id}.pem"
                )
            keys[key_id] = key
        revoked = _read_revoked(path / REVOKED_FILE)
        if not keys:
            raise KeyringError(f"bundle: keyring {path} holds no <key id>.pem files")
        return cls(keys, revoked)

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._keys)

    def lookup(self, key_id: str) -> PublicKey:
        """The trusted key for ``key_id``; RevokedKey or UnknownKey otherwise."""
        if key_id in self.revoked:
            raise RevokedKey(f"bundle: signing key {key_id} is revoked", key_id=key_id)
        key = self._keys.get(key_id)
        if key is None:
            raise UnknownKey(f"bundle: signing key {key_id} is not in the keyring", key_id=key_id)
        return key


def add_public_key(directory: Path, key: PublicKey | CryptographyKey) -> Path:
    """Write ``key`` into a keyring directory under its key id; returns the file written."""
    public = as_public_key(key)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{public.key_id}.pem"
    tmp = target.with_suffix(".pem.tmp")
    tmp.write_bytes(public.pem())
    os.replace(tmp, target)
    return target


def _read_revoked(path: Path) -> frozenset[str]:
    try:
        text = path.read_text("ascii")
    except FileNotFoundError:
        return frozenset()
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyringError(f"bundle: cannot read revocation list {path}: {exc}") from exc
    revoked = set()
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        if not _KEY_ID.fullmatch(entry):
            raise KeyringError(f"bundle: {path}:{number}: {entry!r} is not a 16-hex key id")
        revoked.add(entry)
    return frozenset(revoked)
