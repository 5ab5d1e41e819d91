"""The settings of the test run (pyproject.toml) and of every process it starts.

`orchestrator.settings` fails closed (DEBUG off, SECRET_KEY required); the tests run in
development mode, as `make run` does, with a fixed key that is as public as the development
one. Both go into this process's environment, so the processes that tests spawn
(tests/support/cluster.py, also those started with DEBUG=false) inherit them and share the key
(webhook secrets encrypted here are decrypted in the workers). Django's test client speaks as
`testserver`, which a deployment does not allow.
"""

import os

os.environ.setdefault("DEBUG", "true")
os.environ.setdefault("SECRET_KEY", "tests-only-insecure-key-never-use-in-a-deployment-0123456789")

from orchestrator.settings import *  # noqa: F403

ALLOWED_HOSTS = [*ALLOWED_HOSTS, "testserver"]  # noqa: F405
