"""The content types of approvals and votes follow the models into this app, so that the admin
permissions granted on them (and any log entry of the admin) still point at them."""

from django.db import migrations

MODELS = ("approval", "approvalvote")


def move(apps, schema_editor, *, source: str, target: str) -> None:
    content_type = apps.get_model("contenttypes", "ContentType")
    db = schema_editor.connection.alias
    for model in MODELS:
        if content_type.objects.using(db).filter(app_label=target, model=model).exists():
            continue  # created by a migrate that ran before this one (a fresh database)
        content_type.objects.using(db).filter(app_label=source, model=model).update(
            app_label=target
        )


def forward(apps, schema_editor) -> None:
    move(apps, schema_editor, source="jobs", target="approvals")


def backward(apps, schema_editor) -> None:
    move(apps, schema_editor, source="approvals", target="jobs")


class Migration(migrations.Migration):
    dependencies = [
        ("approvals", "0001_approvals_from_jobs"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [migrations.RunPython(forward, backward)]
