from django.apps import AppConfig


class DashboardConfig(AppConfig):
    name = "dashboard"

    def ready(self) -> None:
        # Connects the Celery signals that start a worker's heartbeat (no-ops in other processes).
        from dashboard import heartbeats  # noqa: F401
