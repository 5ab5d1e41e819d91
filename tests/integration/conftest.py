import pytest

from tests.support.cluster import Cluster


@pytest.fixture
def cluster(transactional_db, tmp_path, ledger):
    """A scheduler-less, worker-less cluster; tests start the processes they need."""
    harness = Cluster(tmp_path, ledger)
    try:
        yield harness
    finally:
        harness.stop_all()


@pytest.fixture
def running(cluster):
    """A scheduler and one worker pool per queue (the tool pool is prefork)."""
    cluster.start_scheduler()
    cluster.start_all_pools()
    return cluster


@pytest.fixture
def web(cluster):
    """A daphne web process on a free port (its base URL). SSE heartbeats every second, so
    that tests see them without waiting 15 s."""
    return cluster.start_web(SWITCHYARD_SSE_HEARTBEAT_S="1")


@pytest.fixture
def stepping(cluster):
    """The scheduler and thread pools for tool and llm steps: enough for the API's streams and
    waits, and quicker to start and stop than `running`."""
    cluster.start_scheduler()
    cluster.start_worker("steps.tool", pool="threads", concurrency=4)
    cluster.start_worker("steps.llm", pool="threads", concurrency=4)
    return cluster


@pytest.fixture(scope="session", autouse=True)
def _no_connection_outlives_the_session(django_db_setup, django_db_blocker):
    """End the connections still open on the test database when the session ends (an event
    loop's executor thread, a process stopped a moment ago), so that pytest-django can drop
    it instead of warning that it is in use and leaving it behind."""
    yield
    from django.db import connection

    with django_db_blocker.unblock(), connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
