import importlib

from django.apps import AppConfig
from django.conf import settings


class JobsConfig(AppConfig):
    name = "jobs"

    def ready(self) -> None:
        # Built-in tools register themselves on import; plugins add kinds and tools.
        importlib.import_module("jobs.steps.tools")
        importlib.import_module("jobs.steps.demo_tools")  # the demo's support agent's
        importlib.import_module("orchestrator.checks")  # registers the settings' checks
        for module in settings.SWITCHYARD_PLUGINS:
            importlib.import_module(module)
