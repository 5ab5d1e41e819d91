"""Approvals move from `jobs` into this app: the models are created in Django's state only.

Their tables, indexes and constraints already exist, created by `jobs` (`jobs_approval`,
`jobs_approvalvote`, which the models keep as their `db_table`), so the database is not
touched and no row is copied: a deployment migrates with its approvals in place.
"""

import django.db.models.deletion
import uuid
from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):

    initial = True

    dependencies = [
        ('jobs', '0010_approvals_to_own_app'),
        ('tenants', '0006_tenant_allowed_origins'),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.CreateModel(
                    name='Approval',
                    fields=[
                        ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                        ('public_id', models.UUIDField(default=uuid.uuid4, editable=False, unique=True)),
                        ('attempt', models.PositiveIntegerField()),
                        ('status', models.CharField(choices=[('pending', 'Pending'), ('approved', 'Approved'), ('rejected', 'Rejected'), ('expired', 'Expired'), ('cancelled', 'Cancelled')], default='pending', max_length=16)),
                        ('prompt', models.TextField()),
                        ('context', models.JSONField(blank=True, default=dict)),
                        ('form_schema', models.JSONField(blank=True, null=True)),
                        ('form_values', models.JSONField(blank=True, default=dict)),
                        ('reviewers', models.CharField(default='reviewer', max_length=64)),
                        ('escalate_to', models.CharField(blank=True, max_length=64)),
                        ('escalate_at', models.DateTimeField(blank=True, null=True)),
                        ('escalated', models.BooleanField(default=False)),
                        ('escalated_at', models.DateTimeField(blank=True, null=True)),
                        ('required_approvals', models.PositiveSmallIntegerField(default=1)),
                        ('due_at', models.DateTimeField(blank=True, null=True)),
                        ('on_timeout', models.CharField(blank=True, max_length=16)),
                        ('on_reject', models.CharField(default='fail', max_length=16)),
                        ('created_at', models.DateTimeField(auto_now_add=True, db_index=True)),
                        ('decided_at', models.DateTimeField(blank=True, null=True)),
                        ('decision', models.CharField(blank=True, choices=[('approve', 'Approve'), ('reject', 'Reject')], max_length=16)),
                        ('decided_by', models.CharField(blank=True, max_length=500)),
                        ('comment', models.TextField(blank=True)),
                        ('data', models.JSONField(blank=True, null=True)),
                        ('run', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='approvals', to='jobs.run')),
                        ('step_run', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='approvals', to='jobs.steprun')),
                        ('tenant', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='approvals', to='tenants.tenant')),
                    ],
                    options={
                        'db_table': 'jobs_approval',
                        'ordering': ['-created_at', '-id'],
                    },
                ),
                migrations.CreateModel(
                    name='ApprovalVote',
                    fields=[
                        ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                        ('api_key_name', models.CharField(blank=True, max_length=100)),
                        ('reviewer', models.CharField(max_length=200)),
                        ('decision', models.CharField(choices=[('approve', 'Approve'), ('reject', 'Reject')], max_length=16)),
                        ('comment', models.TextField(blank=True)),
                        ('data', models.JSONField(blank=True, null=True)),
                        ('at', models.DateTimeField()),
                        ('approval', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='votes', to='approvals.approval')),
                        ('user', models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL, related_name='approval_votes', to=settings.AUTH_USER_MODEL)),
                    ],
                    options={
                        'db_table': 'jobs_approvalvote',
                        'ordering': ['approval', 'at', 'id'],
                    },
                ),
                migrations.AddIndex(
                    model_name='approval',
                    index=models.Index(fields=['tenant', 'status', '-created_at'], name='approval_tenant_status'),
                ),
                migrations.AddIndex(
                    model_name='approval',
                    index=models.Index(condition=models.Q(('status', 'pending')), fields=['due_at'], name='approval_due'),
                ),
                migrations.AddIndex(
                    model_name='approval',
                    index=models.Index(condition=models.Q(('escalated', False), ('status', 'pending')), fields=['escalate_at'], name='approval_escalation_due'),
                ),
                migrations.AddConstraint(
                    model_name='approval',
                    constraint=models.UniqueConstraint(fields=('step_run', 'attempt'), name='approval_unique_attempt'),
                ),
                migrations.AddConstraint(
                    model_name='approvalvote',
                    constraint=models.UniqueConstraint(condition=models.Q(('user__isnull', False)), fields=('approval', 'user'), name='approval_vote_unique_user'),
                ),
                migrations.AddConstraint(
                    model_name='approvalvote',
                    constraint=models.UniqueConstraint(condition=models.Q(('user__isnull', True)), fields=('approval', 'api_key_name'), name='approval_vote_unique_key'),
                ),
            ],
            database_operations=[],
        ),
    ]
