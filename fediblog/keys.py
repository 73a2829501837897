"""The blog's key pairs under keys/: generated once, read at start-up, never served.

``blog.pem`` signs everything the blog actor sends; ``instance.pem`` signs the
server's outbound GETs (the instance actor). Both are RSA-2048 PKCS#8 PEM files
with mode 0600, in a folder with mode 0700. ``ensure_keys`` never overwrites a key
that exists: servers that cached our public key (GoToSocial does, and never
refetches it) would otherwise reject everything we send.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from fediblog.errors import ConfigError

KEY_NAMES = ("blog", "instance")
README = """\
# keys/

Private keys of this blog. `fediblog init` creates them; nothing else writes here.

- `blog.pem` — the blog actor's RSA-2048 key: signs every activity the blog sends
  (Accept, Create, Update, Delete). Its public half is in the actor document.
- `instance.pem` — the instance actor's key: signs the server's outbound GETs.

Each file is mode 0600 (this folder 0700) and git-ignored; `fediblog serve` refuses
keys other users can read. Back them up with the database (`fediblog backup DIR`):
followers' servers cache the public keys, so a lost key means they reject the blog's
posts until they refetch it (some never do). Never commit, copy into a web root, or share
these files.
"""
GITIGNORE = "*\n!README.md\n!.gitignore\n"


@dataclass(frozen=True, slots=True)
class KeyPair:
    private_key: rsa.RSAPrivateKey
    public_pem: str


def fingerprint(public_pem: str) -> str:
    """``SHA256:`` and the unpadded base64 of the SHA-256 of the public key's DER (the
    SubjectPublicKeyInfo), as OpenSSH shows keys: what to compare with what a follower's
    server has cached."""
    der = serialization.load_pem_public_key(public_pem.encode()).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "SHA256:" + base64.b64encode(hashlib.sha256(der).digest()).decode().rstrip("=")


def _write_private(path: Path, key: rsa.RSAPrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # O_EXCL: if two `init`s race, the second fails instead of replacing the key.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)


def _tighten_folder(keys_dir: Path) -> None:
    """Make the folder 0700: a checkout's keys/ (it holds README.md) is 0755, and
    `serve` refuses a keys folder other users can enter or change."""
    mode = keys_dir.stat().st_mode & 0o777
    if mode & 0o077:
        # Not ours to change? Then `serve` refuses it and names the command to run.
        with contextlib.suppress(PermissionError):
            keys_dir.chmod(0o700)


def ensure_keys(keys_dir: Path) -> list[Path]:
    """Create any missing key (and the folder's README); return the files created."""
    try:
        keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        _tighten_folder(keys_dir)
        created: list[Path] = []
        for name, text in (("README.md", README), (".gitignore", GITIGNORE)):
            path = keys_dir / name
            if not path.exists():
                path.write_text(text)
                created.append(path)
        for name in KEY_NAMES:
            path = keys_dir / f"{name}.pem"
            if not path.exists():
                _write_private(path, rsa.generate_private_key(public_exponent=65537, key_size=2048))
                created.append(path)
    except OSError as error:
        raise ConfigError(f"cannot write keys in {keys_dir}: {error.strerror or error}") from None
    return created


def load_key(keys_dir: Path, name: str) -> KeyPair:
    """Read one key pair; a missing or unreadable key is a ConfigError."""
    path = keys_dir / f"{name}.pem"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"no key at {path}: run `fediblog init` first") from None
    except PermissionError:
        raise ConfigError(
            f"cannot read {path}: permission denied (the key must belong to the user"
            " that runs fediblog)"
        ) from None
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror or error}") from None
    # A lost key cannot be made again: followers' servers keep the old public key.
    if not data.strip():
        raise ConfigError(f"{path} is empty: restore it from your backup (`fediblog restore`)")
    try:
        # Our own file, written by `fediblog init` with mode 0600: the (slow) checks that
        # protect against a hostile key buy nothing here and cost 0.1 s per key.
        key = serialization.load_pem_private_key(
            data, password=None, unsafe_skip_rsa_key_validation=True
        )
    except (ValueError, TypeError):
        raise ConfigError(
            f"{path} is not an unencrypted PEM private key (truncated or damaged?):"
            " restore it from your backup (`fediblog restore`)"
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ConfigError(f"{path} is not an RSA key")
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return KeyPair(private_key=key, public_pem=public_pem.decode())
