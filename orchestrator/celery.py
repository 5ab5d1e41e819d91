"""The Celery application: `celery -A orchestrator worker -Q steps.llm` starts a pool."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "orchestrator.settings")

app = Celery("orchestrator")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
# A worker running steps unheld keeps their slots' prefetch credit (jobs/worker_credit.py).
app.steps["consumer"].add("jobs.worker_credit:UnheldCredit")
