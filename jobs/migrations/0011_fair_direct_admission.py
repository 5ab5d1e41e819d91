"""Direct admission also when other tenants' steps wait, for the tenant the fair policy would
pick first, and the fair reserve of each queue's broker depth (docs/scheduling.md)."""

from django.db import migrations

from jobs.transitions.sql import install_sql


class Migration(migrations.Migration):
    dependencies = [("jobs", "0010_approvals_to_own_app")]

    operations = [migrations.RunSQL(install_sql(), migrations.RunSQL.noop)]
