"""A direct admission waits briefly for the admission lock when its tenant's steps would be
admitted first, instead of leaving them to the next scheduler cycle (docs/scheduling.md)."""

from django.db import migrations

from jobs.transitions.sql import install_sql


class Migration(migrations.Migration):
    dependencies = [("jobs", "0011_fair_direct_admission")]

    operations = [migrations.RunSQL(install_sql(), migrations.RunSQL.noop)]
