"""Direct admission takes the tenant's ready steps in the scheduler's order, its older ones
first, instead of leaving every newer step to the scheduler while an older one waits
(docs/scheduling.md)."""

from django.db import migrations

from jobs.transitions.sql import install_sql


class Migration(migrations.Migration):
    dependencies = [("jobs", "0013_admission_epoch")]

    operations = [migrations.RunSQL(install_sql(), migrations.RunSQL.noop)]
