"""The transition functions stop sending NOTIFY inside the hot path's transactions: they say
whether the scheduler should be woken, and the caller wakes it after the commit
(jobs/wakeups.py)."""

from django.db import migrations

from jobs.transitions.sql import install_sql


class Migration(migrations.Migration):
    dependencies = [("jobs", "0007_transition_functions")]

    operations = [migrations.RunSQL(install_sql(), migrations.RunSQL.noop)]
