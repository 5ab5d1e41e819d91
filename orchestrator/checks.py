"""System checks of Switchyard's own settings (run by `manage.py check`, `--deploy` for these).

Django's deploy checks cannot know that `SECRET_KEY` holds the development key of
`orchestrator.settings`: that key is long and varied enough to pass `security.W009`, yet it is
public (it is in the repository), so sessions, CSRF tokens and the keys that encrypt webhook
secrets (`orchestrator.encryption`) would be forgeable. Nor that llm steps would answer with
simulated text, or fail, for want of a provider.
"""

from __future__ import annotations

from django.conf import settings
from django.core.checks import Error, Tags, Warning, register

from jobs.steps.llm import PROVIDERS


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


@register(deploy=True)
def check_llm_steps_have_a_provider(app_configs, **kwargs) -> list[Error]:
    """With DEBUG off the default provider is unset (`orchestrator.settings`): a deployment
    names one, `simulated` included when that is what it wants (the benchmark does)."""
    if settings.DEBUG:
        return []
    provider = settings.SWITCHYARD_LLM_DEFAULT_PROVIDER
    if not provider:
        return [
            Error(
                "SWITCHYARD_LLM_DEFAULT_PROVIDER is not set: every llm step that names no "
                "provider would fail.",
                hint=f"Set it to one of {', '.join(PROVIDERS)} (openai: an OpenAI-compatible "
                "server, with SWITCHYARD_OPENAI_API_KEY).",
                id="switchyard.E002",
            )
        ]
    if provider not in PROVIDERS:
        return [
            Error(
                f"SWITCHYARD_LLM_DEFAULT_PROVIDER is {provider!r}, which is no llm provider.",
                hint=f"Set it to one of {', '.join(PROVIDERS)}.",
                id="switchyard.E002",
            )
        ]
    if provider == "openai" and not settings.SWITCHYARD_OPENAI_API_KEY:
        return [
            Error(
                "SWITCHYARD_LLM_DEFAULT_PROVIDER is openai but SWITCHYARD_OPENAI_API_KEY is not "
                "set: every llm step that names no provider would fail.",
                hint="Set SWITCHYARD_OPENAI_API_KEY.",
                id="switchyard.E003",
            )
        ]
    return []
