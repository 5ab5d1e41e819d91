"""Create the database named by DATABASE_URL if it does not exist yet (used by `make run`)."""

import os
import sys

import dj_database_url
import psycopg
from psycopg import sql

url = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/switchyard")
params = dj_database_url.parse(url)
connect = {
    "dbname": "postgres",
    "user": params["USER"] or None,
    "password": params["PASSWORD"] or None,
    "host": params["HOST"] or None,
    "port": params["PORT"] or None,
    "autocommit": True,
    "connect_timeout": 5,
}
try:
    with psycopg.connect(**connect) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", [params["NAME"]]
        ).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(params["NAME"])))
            print(f"Created database {params['NAME']}")
except psycopg.Error as exc:
    sys.exit(f"error: cannot reach PostgreSQL for {url}: {exc}")
