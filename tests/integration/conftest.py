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
