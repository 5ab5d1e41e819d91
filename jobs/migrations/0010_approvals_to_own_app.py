"""Approvals and their votes leave `jobs` for their own app (`approvals`), in Django's state
only: the tables stay where they are, under the same names, and the `approvals` app's first
migration takes them over (`approvals/migrations/0001_approvals_from_jobs.py`).
"""

from django.db import migrations


class Migration(migrations.Migration):

    dependencies = [
        ('jobs', '0009_hot_tables_fewer_indexes'),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.RemoveField(
                    model_name='approvalvote',
                    name='approval',
                ),
                migrations.RemoveField(
                    model_name='approvalvote',
                    name='user',
                ),
                migrations.DeleteModel(
                    name='Approval',
                ),
                migrations.DeleteModel(
                    name='ApprovalVote',
                ),
            ],
            database_operations=[],
        ),
    ]
