"""Fixtures of the security tests: the world they attack (tests/support/security.py)."""

from __future__ import annotations

import pytest

from tests.support.security import World, build_world


@pytest.fixture
def world(db) -> World:
    return build_world()


@pytest.fixture
def live_world(transactional_db) -> World:
    """The same world, committed: for async views and consumers, which read the database on
    threads of their own."""
    return build_world()


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    """Signing in with a wrong password still hashes it: keep that cheap in these tests."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
