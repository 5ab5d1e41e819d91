"""System checks of Switchyard's own settings (run by `manage.py check`, `--deploy` for these).

Django's deploy checks cannot know that `SECRET_KEY` still holds the development default of
`orchestrator.settings`: that key is long and varied enough to pass `security.W009`, yet it is
public (it is in the repository), so sessions, CSRF tokens and the keys that encrypt webhook
secrets (`orchestrator.encryption`) would be forgeable.
"""

from __future__ import annotations

from django.conf import settings
from django.core.checks import Tags, Warning, register


@register(Tags.security, deploy=True)
def check_secret_key_is_not_the_development_default(app_configs, **kwargs) -> list[Warning]:
    if settings.SECRET_KEY != settings.DEVELOPMENT_SECRET_KEY:
        return []
    return [
        Warning(
            "SECRET_KEY is the development default, which is public.",
            hint="Set SECRET_KEY in the environment to a long random string, e.g. "
            '`python -c "import secrets; print(secrets.token_urlsafe(50))"`.',
            id="switchyard.W001",
        )
    ]
