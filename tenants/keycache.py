"""The per-process cache of API keys: a submission authenticates without a query.

An entry lives `SWITCHYARD_API_KEY_CACHE_S` seconds (1 by default), so a key revoked in
another process is refused by every process within that bound; the process that revokes it
forgets it at once, and a submission also checks the key in its one statement (refused at
once everywhere). Only live keys are cached: an unknown key is looked up every time.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from django.conf import settings

if TYPE_CHECKING:
    from tenants.models import ApiKey

_MAX_ENTRIES = 10_000
_entries: dict[str, tuple[float, ApiKey]] = {}
_lock = threading.Lock()


def cached_key(key_hash: str) -> ApiKey | None:
    hit = _entries.get(key_hash)
    if hit is None or hit[0] < time.monotonic():
        return None
    return hit[1]


def remember_key(api_key: ApiKey) -> None:
    ttl = settings.SWITCHYARD_API_KEY_CACHE_S
    if ttl <= 0:
        return
    with _lock:
        if len(_entries) >= _MAX_ENTRIES:
            _entries.clear()
        _entries[api_key.key_hash] = (time.monotonic() + ttl, api_key)


def forget_key(key_hash: str) -> None:
    with _lock:
        _entries.pop(key_hash, None)
