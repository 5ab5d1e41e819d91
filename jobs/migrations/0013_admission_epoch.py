"""The admission epoch: a sequence that every admission advances, so that the scheduler may
decide without holding the admission lock and hold it only for its writes (jobs/scheduler.py)."""

from django.db import migrations

from jobs.transitions.sql import install_sql


class Migration(migrations.Migration):
    dependencies = [("jobs", "0012_admission_lock_wait")]

    operations = [
        migrations.RunSQL(
            "CREATE SEQUENCE IF NOT EXISTS switchyard_admission_epoch",
            "DROP SEQUENCE IF EXISTS switchyard_admission_epoch",
        ),
        migrations.RunSQL(install_sql(), migrations.RunSQL.noop),
    ]
