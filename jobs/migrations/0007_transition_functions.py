from django.db import migrations

from jobs.transitions.sql import install_sql, uninstall_sql


class Migration(migrations.Migration):
    dependencies = [
        ("jobs", "0006_steprun_ready_bucket_index"),
        ("tenants", "0005_usage_append_only"),
    ]

    operations = [migrations.RunSQL(install_sql(), uninstall_sql())]
