"""Encryption of secrets at rest (tenants' webhook signing secrets).

A secret that the platform must read back (to sign webhooks) cannot be hashed like an API key,
so it is encrypted with Fernet (AES-128-CBC + HMAC-SHA256, from `cryptography`). The Fernet
keys are derived with HKDF-SHA256 from `SWITCHYARD_ENCRYPTION_KEY`, or from `SECRET_KEY` when
that is empty, so any high-entropy string works as a key.

`SWITCHYARD_ENCRYPTION_KEY` may list several keys, comma-separated: the first encrypts, all
decrypt (`MultiFernet`). To rotate, put the new key first and keep the old one until every
secret has been rewritten (rotating a tenant's webhook secret rewrites it).
"""

from __future__ import annotations

import base64
import functools

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.conf import settings

# Bound into every derived key: the same SECRET_KEY yields unrelated keys for other uses.
_CONTEXT = b"switchyard:secrets-at-rest:v1"


class DecryptionError(RuntimeError):
    """A stored secret cannot be decrypted with any configured key."""


def _derive(material: str) -> Fernet:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_CONTEXT).derive(
        material.encode()
    )
    return Fernet(base64.urlsafe_b64encode(key))


@functools.lru_cache(maxsize=8)
def _cipher(materials: tuple[str, ...]) -> MultiFernet:
    return MultiFernet([_derive(material) for material in materials])


def _configured_keys() -> tuple[str, ...]:
    configured = [part.strip() for part in settings.SWITCHYARD_ENCRYPTION_KEY.split(",")]
    keys = tuple(part for part in configured if part)
    return keys or (settings.SECRET_KEY,)


def encrypt(plaintext: str) -> str:
    return _cipher(_configured_keys()).encrypt(plaintext.encode()).decode()


def decrypt(token: str) -> str:
    try:
        return _cipher(_configured_keys()).decrypt(token.encode()).decode()
    except InvalidToken:
        raise DecryptionError(
            "cannot decrypt a stored secret with SWITCHYARD_ENCRYPTION_KEY (or SECRET_KEY): "
            "was the key changed without keeping the old one in the list?"
        ) from None
