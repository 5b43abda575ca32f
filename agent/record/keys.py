"""The unit's Ed25519 key: generated once into the state directory, used to sign checkpoints.

Files in the state directory::

    unit.key   the private key, PKCS#8 PEM, unencrypted, mode 0600 (refused if group/other
               can read it, as ssh does)
    unit.pub   the raw 32-byte public key in base64, one line, mode 0600: what enrolment
               sends to the control site

The key id is the first 16 hex digits of SHA-256 of the raw public key; checkpoints name it.
``PublicKey`` is all a verifier needs (the control site imports it).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.record.format import UnitKeyError

KEY_FILE = "unit.key"
PUB_FILE = "unit.pub"
_HEX_RE = re.compile(r"^[0-9a-fA-F]{64}$")


def key_id_of(raw_public: bytes) -> str:
    """Key id: the first 16 hex digits of SHA-256 of the raw 32-byte public key."""
    return hashlib.sha256(raw_public).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class PublicKey:
    """A unit's public key (raw 32 bytes), as enrolled at the control site."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != 32:
            raise UnitKeyError(f"an Ed25519 public key has 32 bytes, got {len(self.raw)}")

    @classmethod
    def parse(cls, text: str) -> PublicKey:
        """From 64 hex digits or base64 of the raw key (``unit.pub``'s content)."""
        text = text.strip()
        try:
            raw = (
                bytes.fromhex(text)
                if _HEX_RE.match(text)
                else base64.b64decode(text, validate=True)
            )
        except (ValueError, binascii.Error) as exc:
            raise UnitKeyError(f"public key {text!r} is neither hex nor base64") from exc
        return cls(raw)

    @property
    def b64(self) -> str:
        """Base64 of the raw key."""
        return base64.b64encode(self.raw).decode("ascii")

    @property
    def hex(self) -> str:
        """Hex of the raw key."""
        return self.raw.hex()

    @property
    def key_id(self) -> str:
        """First 16 hex digits of SHA-256 of the raw key."""
        return key_id_of(self.raw)

    def verify(self, signature: bytes, data: bytes) -> bool:
        """Whether ``signature`` is this key's Ed25519 signature of ``data``."""
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, data)
        except InvalidSignature:
            return False
        return True


class UnitKey:
    """The unit's private signing key."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        raw = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.public_key = PublicKey(raw)

    @classmethod
    def generate(cls) -> UnitKey:
        """A new random key."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> UnitKey:
        """A key from a 32-byte seed: for test vectors only, never for a unit."""
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @property
    def key_id(self) -> str:
        """The public key's id."""
        return self.public_key.key_id

    def sign(self, data: bytes) -> bytes:
        """Ed25519 signature (64 bytes) of ``data``."""
        return self._private.sign(data)

    def private_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM."""
        return self._private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def __repr__(self) -> str:
        return f"UnitKey(key_id={self.key_id!r})"


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` atomically (temporary file, fsync, rename) with ``mode`` from creation."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it; never widened
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_key_files(
    state_dir: str | Path, key: UnitKey, *, key_name: str = KEY_FILE, public: bool = True
) -> None:
    """Write ``key`` into ``state_dir`` as ``key_name`` (and ``unit.pub``), each atomically,
    0600."""
    state = Path(state_dir)
    try:
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write_file(state / key_name, key.private_pem(), 0o600)
        if public:
            write_public_key(state / PUB_FILE, key.public_key)
    except OSError as exc:
        raise UnitKeyError(f"cannot write the unit key into {state}: {exc}") from exc


def write_public_key(path: str | Path, key: PublicKey) -> None:
    """Write a public key file like ``unit.pub`` (base64, one line, 0600)."""
    try:
        _write_file(Path(path), (key.b64 + "\n").encode("ascii"), 0o600)
    except OSError as exc:
        raise UnitKeyError(f"cannot write the public key {path}: {exc}") from exc


def init_unit_key(state_dir: str | Path, *, force: bool = False) -> tuple[UnitKey, str]:
    """Generate the unit key into ``state_dir`` and return it with its base64 public key.

    Refuses to replace an existing key unless ``force``: a new key orphans the enrolment (use
    ``bedside keys rotate`` to change the key of a unit that has a journal).
    """
    key_path = Path(state_dir) / KEY_FILE
    if key_path.exists() and not force:
        raise UnitKeyError(
            f"{key_path} already exists; replacing it needs force (and a new enrolment)"
        )
    key = UnitKey.generate()
    write_key_files(state_dir, key)
    return key, key.public_key.b64


def load_unit_key(state_dir: str | Path) -> UnitKey:
    """Load ``unit.key`` from ``state_dir``; refuses a key file group or others can read."""
    return load_key_file(Path(state_dir) / KEY_FILE)


def load_key_file(key_path: Path) -> UnitKey:
    """Load a private unit key file; refuses one group or others can read."""
    try:
        mode = key_path.stat().st_mode & 0o777
        if mode & 0o077:
            raise UnitKeyError(
                f"{key_path} has mode {mode:04o}; the unit key must be private (chmod 600)"
            )
        private = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise UnitKeyError(f"no unit key at {key_path}; run `bedside keys init`") from exc
    except (OSError, ValueError, TypeError) as exc:
        raise UnitKeyError(f"cannot read the unit key {key_path}: {exc}") from exc
    if not isinstance(private, Ed25519PrivateKey):
        raise UnitKeyError(f"{key_path} holds a {type(private).__name__}, not an Ed25519 key")
    return UnitKey(private)


def load_public_key(path: str | Path) -> PublicKey:
    """Read a public key file (base64 or hex, like ``unit.pub``)."""
    try:
        return PublicKey.parse(Path(path).read_text(encoding="ascii"))
    except (OSError, UnicodeDecodeError) as exc:
        raise UnitKeyError(f"cannot read the public key {path}: {exc}") from exc
