"""Pieces of the client API that need no services: webhook signatures (checked with the
snippet the docs publish), encryption of secrets at rest, the retry schedule, and the
refusal of JSON that PostgreSQL cannot store."""

from __future__ import annotations

import datetime
import time

import pytest

from jobs.api.parsers import unstorable_path
from jobs.services.webhooks import _backoff_s
from jobs.webhooks import webhook_headers, webhook_signature
from orchestrator.encryption import DecryptionError, decrypt, encrypt
from tests.support.signatures import ROOT, documented_snippet, documented_verifier

SECRET = "whsec_test-secret"
BODY = '{"id":"5f0c","type":"run.succeeded","run":{"status":"succeeded"}}'


def test_the_signature_is_an_hmac_of_timestamp_dot_body():
    # Computed independently: printf '1700000000.{}' | openssl dgst -sha256 -hmac whsec_x
    assert webhook_signature("whsec_x", 1700000000, "{}") == (
        "v1=be8cb8325f2202445260a855532f967e30ad2a9394ce28da66ee02880ddcb661"
    )


def test_the_documented_snippet_accepts_a_signed_body_and_nothing_else():
    verify = documented_verifier()
    now = int(time.time())
    headers = webhook_headers(secret=SECRET, event_id="5f0c", timestamp=now, body=BODY)
    assert verify(SECRET, headers, BODY.encode())
    assert not verify(SECRET, headers, BODY.replace("succeeded", "failed").encode())
    assert not verify("whsec_other", headers, BODY.encode())
    stale = webhook_headers(secret=SECRET, event_id="5f0c", timestamp=now - 600, body=BODY)
    assert not verify(SECRET, stale, BODY.encode())  # replayed 10 minutes later
    assert not verify(SECRET, {**headers, "Switchyard-Signature": ""}, BODY.encode())
    # Several signatures (a future key rotation): any match is enough.
    both = {**headers, "Switchyard-Signature": "v1=00ff, " + headers["Switchyard-Signature"]}
    assert verify(SECRET, both, BODY.encode())


def test_the_readme_publishes_the_same_snippet_as_the_api_guide():
    assert documented_snippet(ROOT / "README.md") == documented_snippet()


def test_a_secret_encrypts_to_a_different_token_each_time_and_decrypts_back(settings):
    settings.SWITCHYARD_ENCRYPTION_KEY = ""
    first, second = encrypt(SECRET), encrypt(SECRET)
    assert first != second and SECRET not in first
    assert decrypt(first) == decrypt(second) == SECRET


def test_the_encryption_key_defaults_to_one_derived_from_secret_key(settings):
    settings.SWITCHYARD_ENCRYPTION_KEY = ""
    token = encrypt(SECRET)
    settings.SECRET_KEY = "another-secret-key"
    with pytest.raises(DecryptionError, match="SWITCHYARD_ENCRYPTION_KEY"):
        decrypt(token)


def test_encryption_keys_rotate_by_listing_the_new_one_first(settings):
    settings.SWITCHYARD_ENCRYPTION_KEY = "old-key"
    old_token = encrypt(SECRET)
    settings.SWITCHYARD_ENCRYPTION_KEY = "new-key, old-key"
    assert decrypt(old_token) == SECRET  # still readable
    new_token = encrypt(SECRET)
    settings.SWITCHYARD_ENCRYPTION_KEY = "new-key"
    assert decrypt(new_token) == SECRET
    with pytest.raises(DecryptionError):
        decrypt(old_token)


def test_webhook_retries_double_from_the_base_delay_up_to_the_cap(settings):
    settings.SWITCHYARD_WEBHOOK_BACKOFF_S = 30
    settings.SWITCHYARD_WEBHOOK_MAX_BACKOFF_S = 3600
    delays = [_backoff_s(attempt) for attempt in range(1, 11)]
    assert delays == [30, 60, 120, 240, 480, 960, 1920, 3600, 3600, 3600]
    # At the defaults a delivery is tried about 31 times in its 24 hours.
    elapsed, attempts = 0.0, 1
    while elapsed < 86_400:
        elapsed += _backoff_s(attempts)
        attempts += 1
    assert 28 <= attempts <= 34


@pytest.mark.parametrize(
    ("value", "path"),
    [
        ({"a": ["ok", {"b": "nul\x00"}]}, "$.a[1].b"),
        ({"text": "lone \ud800 surrogate"}, "$.text"),
        ({"bad\x00key": 1}, "$.'bad\\x00key'"),
        ({"n": float("inf")}, "$.n"),
        ({"n": float("nan")}, "$.n"),
        ({"when": datetime.date(2020, 1, 1)}, "$.when"),
    ],
)
def test_values_postgresql_cannot_store_are_found_with_their_path(value, path):
    assert unstorable_path(value) == path


def test_ordinary_json_is_storable():
    assert unstorable_path({"a": [1, 2.5, True, None, "naïve 😀", {"b": []}]}) is None
