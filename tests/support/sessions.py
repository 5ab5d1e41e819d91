"""Another PostgreSQL session on the test database, as another process (a scheduler, a worker)
would hold one: for tests that take a lock from outside the code under test."""

from __future__ import annotations

import psycopg
from django.db import connection


def other_session() -> psycopg.Connection:
    """A new autocommit connection to the database Django's connection uses (close it, or use
    it as a context manager)."""
    params = connection.settings_dict
    return psycopg.connect(
        dbname=params["NAME"],
        user=params["USER"] or None,
        host=params["HOST"] or None,
        port=params["PORT"] or None,
        autocommit=True,
    )
