"""Switchyard settings, read from the environment (12-factor) with defaults for local services.

Every variable is listed in `.env.example`. Readers in `orchestrator.env` fail loudly on bad
values. App code reads `django.conf.settings` at call time, never at import time.
"""

from pathlib import Path

import dj_database_url

from orchestrator.env import (
    ConfigError,
    env_bool,
    env_choice,
    env_float,
    env_int,
    env_list,
    env_map_float,
    env_map_int,
    env_str,
)
from orchestrator.queues import MAX_PRIORITY, broker_queue

BASE_DIR = Path(__file__).resolve().parent.parent

# Fail closed: DEBUG is off unless asked for (`make run` and the tests ask), and a deployment
# without DEBUG must set SECRET_KEY. Only with DEBUG on does a missing SECRET_KEY fall back to
# DEVELOPMENT_SECRET_KEY, which is public (it is in the repository); `check --deploy` refuses it
# (switchyard.W001, orchestrator/checks.py).
DEBUG = env_bool("DEBUG", False)
DEVELOPMENT_SECRET_KEY = "dev-only-insecure-key-change-me-in-production-0123456789"
SECRET_KEY = env_str("SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        raise ConfigError(
            "SECRET_KEY is not set. With DEBUG off (the default) every process needs SECRET_KEY "
            "in its environment: a long random string, e.g. "
            '`python -c "import secrets; print(secrets.token_urlsafe(50))"`. '
            "For local development set DEBUG=true instead (`make run` does)."
        )
    SECRET_KEY = DEVELOPMENT_SECRET_KEY
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

# --- Production security (docs/security.md) -------------------------------------------------
# With DEBUG off the web process is served over HTTPS, normally behind a proxy that terminates
# TLS and sets X-Forwarded-Proto (overwriting any value a client sent). Every default below
# follows DEBUG; the environment may override each one, e.g. SECURE_SSL_REDIRECT=false to serve
# plain http on 127.0.0.1 with DEBUG off (the tests' and the benchmark's web processes do).
# `manage.py check --deploy` is clean with these defaults (tests/security/test_settings.py).
_HTTPS = not DEBUG
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", _HTTPS)
SECURE_PROXY_SSL_HEADER = (
    ("HTTP_X_FORWARDED_PROTO", "https") if env_bool("SECURE_PROXY_SSL_HEADER", _HTTPS) else None
)
# Health probes come over plain http from inside the network.
SECURE_REDIRECT_EXEMPT = [r"^healthz$"]
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31_536_000 if _HTTPS else 0, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", _HTTPS)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", _HTTPS)
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
SECURE_CROSS_ORIGIN_OPENER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", _HTTPS)
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", _HTTPS)
CSRF_COOKIE_SAMESITE = "Lax"
# --- end of production security -------------------------------------------------------------

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.postgres",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_celery_results",
    "channels",
    "tenants",
    "jobs",
    "approvals",
    "dashboard",
    "schedules",
    "maintenance",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "orchestrator.middleware.RequestBodyLimitMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "orchestrator.urls"
ASGI_APPLICATION = "orchestrator.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# A process that serves many threads (daphne runs each request on a thread of its own; a threads
# worker pool has one per slot) sets DATABASE_POOL_MAX_SIZE: its threads then borrow from a
# bounded pool of connections, waiting up to DATABASE_POOL_TIMEOUT_S for one, instead of each
# opening its own until PostgreSQL refuses ("too many clients"). 0 (the default, and required for
# prefork workers, whose children must not inherit a pool) keeps one persistent connection per
# thread for DATABASE_CONN_MAX_AGE seconds. See docs/decisions.md.
DATABASE_POOL_MAX_SIZE = env_int("DATABASE_POOL_MAX_SIZE", 0, minimum=0)
DATABASES = {
    "default": dj_database_url.parse(
        env_str("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/switchyard"),
        conn_max_age=(
            0 if DATABASE_POOL_MAX_SIZE else env_int("DATABASE_CONN_MAX_AGE", 60, minimum=0)
        ),
        conn_health_checks=True,
    )
}
# Every connection of every process runs with these bounds (docs/reliability.md, "Progress
# isolation"), so that one stalled process (SIGSTOP, a GC pause, a partition) cannot hold the
# others: PostgreSQL ends a transaction left idle for DATABASE_IDLE_IN_TRANSACTION_TIMEOUT_MS
# (its locks are released; the stalled worker's report is refused or retried when it wakes),
# a statement waiting for a row lock gives up after DATABASE_LOCK_TIMEOUT_MS (the caller
# retries: a worker's report, the next scheduler cycle), and no statement runs longer than
# DATABASE_STATEMENT_TIMEOUT_MS. Our transactions never wait on a client between statements
# for more than milliseconds, and a run's lock is held for milliseconds, so the bounds only
# ever cut off a stalled holder.
DATABASE_LOCK_TIMEOUT_MS = env_int("DATABASE_LOCK_TIMEOUT_MS", 2_000, minimum=0)
DATABASE_IDLE_IN_TRANSACTION_TIMEOUT_MS = env_int(
    "DATABASE_IDLE_IN_TRANSACTION_TIMEOUT_MS", 5_000, minimum=0
)
DATABASE_STATEMENT_TIMEOUT_MS = env_int("DATABASE_STATEMENT_TIMEOUT_MS", 30_000, minimum=0)
DATABASES["default"].setdefault("OPTIONS", {})["options"] = " ".join(
    [
        f"-c lock_timeout={DATABASE_LOCK_TIMEOUT_MS}",
        f"-c idle_in_transaction_session_timeout={DATABASE_IDLE_IN_TRANSACTION_TIMEOUT_MS}",
        f"-c statement_timeout={DATABASE_STATEMENT_TIMEOUT_MS}",
    ]
)
if DATABASE_POOL_MAX_SIZE:
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": min(2, DATABASE_POOL_MAX_SIZE),
        "max_size": DATABASE_POOL_MAX_SIZE,
        "timeout": env_float("DATABASE_POOL_TIMEOUT_S", 30.0, minimum=0.1),
    }
# Several test sessions on one machine (CI beside a developer) each need a database of their own.
if env_str("TEST_DATABASE_NAME", ""):
    DATABASES["default"]["TEST"] = {"NAME": env_str("TEST_DATABASE_NAME", "")}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = BASE_DIR / ".staticfiles"

# Reviewers (the inbox) and operators sign in here (templates/registration/login.html).
LOGIN_URL = "/accounts/login/"

# --- Redis channel layer (live streams and dashboards) --------------------------------------
REDIS_URL = env_str("REDIS_URL", "redis://127.0.0.1:6379/0")
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {
            "hosts": [
                {
                    "address": REDIS_URL,
                    # redis-py 8 times reads out after 5 s by default, as long as channels_redis
                    # blocks in BZPOPMIN: receive() then raises on every idle channel
                    # instead of waiting. Longer than the pop, so a dead Redis still shows.
                    "socket_timeout": 15,
                }
            ],
            "prefix": env_str("CHANNEL_LAYER_PREFIX", "switchyard"),
            "capacity": 1000,
            # Every consumer of one process (a daphne with a thousand SSE clients) receives
            # through one Redis key ("specific.<process>!"), and the capacity counts that key's
            # pending messages: at 1,000, a burst of events for many clients was dropped
            # (silently, by group_send) and those clients waited for their next heartbeat's
            # resync. Messages still expire after `expiry`, which bounds the key's memory.
            "channel_capacity": {"specific.*": 100_000},
            "expiry": 30,
        },
    }
}

# --- Celery on RabbitMQ -----------------------------------------------------------------------
# The traps these settings avoid: docs/decisions.md and docs/architecture.md (invariants 1, 5, 13).
SWITCHYARD_QUEUE_PREFIX = env_str("SWITCHYARD_QUEUE_PREFIX", "")
_STEP_QUEUES = ["steps.llm", "steps.tool", "steps.retrieval", "steps.control"]

CELERY_BROKER_URL = env_str("BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
# Confirmed publishes: a publish returns only once RabbitMQ has taken the message.
CELERY_BROKER_TRANSPORT_OPTIONS = {"confirm_publish": True, "max_retries": 3}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BROKER_CONNECTION_TIMEOUT = env_float("BROKER_CONNECTION_TIMEOUT", 4.0, minimum=0.1)
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = False
# After a broker reconnection with tasks still running, Celery lowers the prefetch count and
# raises it again as those tasks are acknowledged; their acknowledgements belong to the closed
# connection and fail, so it is never raised and the consumer can stall (seen by
# the chaos suite as a worker that consumed nothing after a RabbitMQ restart). The documented
# workaround: keep the full prefetch (one message per slot) across reconnections.
CELERY_WORKER_ENABLE_PREFETCH_COUNT_REDUCTION = False
# A channel error (RabbitMQ closing a channel whose delivery outlived its consumer_timeout)
# restarts the consumer; without this, Celery treats it as unrecoverable and the worker exits
# with every step it was running (found by the chaos suite).
CELERY_BROKER_CHANNEL_ERROR_RETRY = True
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_DEFAULT_DELIVERY_MODE = "persistent"
CELERY_TASK_QUEUE_MAX_PRIORITY = MAX_PRIORITY
CELERY_TASK_DEFAULT_PRIORITY = 5
CELERY_TASK_DEFAULT_QUEUE = SWITCHYARD_QUEUE_PREFIX + "maintenance"
CELERY_TASK_QUEUES = [
    broker_queue(name, SWITCHYARD_QUEUE_PREFIX)
    for name in [*_STEP_QUEUES, "webhooks", "maintenance"]
]
# Results only for the engine's own maintenance tasks; step tasks set ignore_result.
CELERY_RESULT_BACKEND = "django-db"
CELERY_RESULT_EXTENDED = True
CELERY_TASK_IGNORE_RESULT = True
# Celery's task events (received, started, succeeded: three more AMQP messages per step, a
# sixth of a worker's CPU on zero-latency steps) are for monitors such as Flower, which turns
# them on in the running workers itself (its `enable_events` option, on by default); nothing of
# Switchyard reads them. CELERY_TASK_EVENTS=true sends them from the start.
CELERY_WORKER_SEND_TASK_EVENTS = env_bool("CELERY_TASK_EVENTS", False)
CELERY_TASK_SEND_SENT_EVENT = False

# --- Switchyard engine ----------------------------------------------------------------------
SWITCHYARD_PLUGINS = env_list("SWITCHYARD_PLUGINS", [])
SWITCHYARD_SCHEDULER_POLL_S = env_float("SWITCHYARD_SCHEDULER_POLL_S", 1.0, minimum=0.01)
SWITCHYARD_SCHEDULER_BATCH = env_int("SWITCHYARD_SCHEDULER_BATCH", 200, minimum=1)
# Recovery sweeps (due retries, expired leases, stale dispatches, approvals' deadlines) run at
# most this often; a NOTIFY wakes admission alone. Defaults to the poll interval.
SWITCHYARD_SCHEDULER_SWEEP_S = env_float(
    "SWITCHYARD_SCHEDULER_SWEEP_S", SWITCHYARD_SCHEDULER_POLL_S, minimum=0.01
)
# A process wakes the scheduler (a NOTIFY, jobs/wakeups.py) at most once per this interval:
# the first wake-up after a quiet interval goes at once, faster ones are joined.
SWITCHYARD_WAKE_INTERVAL_S = env_float("SWITCHYARD_WAKE_INTERVAL_S", 0.005, minimum=0.0)
SWITCHYARD_DISPATCH_STALE_S = env_float("SWITCHYARD_DISPATCH_STALE_S", 30.0, minimum=0.1)
SWITCHYARD_LEASE_GRACE_S = env_float("SWITCHYARD_LEASE_GRACE_S", 10.0, minimum=0.0)
# A step whose attempt may run longer than this (timeout_s + lease grace) is acknowledged to
# RabbitMQ when a worker starts it instead of when it ends, so that no delivery is held past
# the broker's consumer_timeout (30 min by default): keep this well below it.
SWITCHYARD_HELD_DELIVERY_MAX_S = env_float("SWITCHYARD_HELD_DELIVERY_MAX_S", 900.0, minimum=1.0)
SWITCHYARD_STEP_DEFAULT_TIMEOUT_S = env_float("SWITCHYARD_STEP_DEFAULT_TIMEOUT_S", 300.0, minimum=1)
SWITCHYARD_QUEUE_MAX_QUEUED = env_int("SWITCHYARD_QUEUE_MAX_QUEUED", 64, minimum=1)
# Fair scheduling (jobs/admission.py). Capacity per queue = the concurrency of its pools; the
# broker holds at most capacity * depth factor admitted-but-unstarted steps per queue.
SWITCHYARD_POOL_CAPACITY = env_map_int(
    "SWITCHYARD_POOL_CAPACITY",
    {"steps.llm": 64, "steps.tool": 4, "steps.retrieval": 8, "steps.control": 8},
)
SWITCHYARD_QUEUE_DEPTH_FACTOR = env_float("SWITCHYARD_QUEUE_DEPTH_FACTOR", 0.5, minimum=0.0)
# A transaction that makes steps ready admits them itself when nothing else waits in their
# queue (jobs/admission.py, "Direct admission"); off, every step waits for a scheduler cycle.
SWITCHYARD_DIRECT_ADMISSION = env_bool("SWITCHYARD_DIRECT_ADMISSION", True)
# How long a direct admission waits for the admission lock that a scheduler cycle holds, when its
# tenant's steps would be admitted first (0: never waits; the scheduler admits them next).
SWITCHYARD_ADMISSION_LOCK_WAIT_MS = env_int("SWITCHYARD_ADMISSION_LOCK_WAIT_MS", 100, minimum=0)
SWITCHYARD_ADMISSION_POLICY = env_choice("SWITCHYARD_ADMISSION_POLICY", "fair", ["fair", "fifo"])
SWITCHYARD_LANE_MIN_SHARE = env_map_float(
    "SWITCHYARD_LANE_MIN_SHARE", {"standard": 0.2, "batch": 0.1}
)
# The last places of each queue's broker depth that only a tenant below its fair share may take
# (jobs/admission.py `fair_reserve`): a neighbour's flood never fills the queue to the brim.
SWITCHYARD_FAIR_RESERVE = env_float("SWITCHYARD_FAIR_RESERVE", 0.25, minimum=0.0)
SWITCHYARD_RATE_BURST_S = env_float("SWITCHYARD_RATE_BURST_S", 10.0, minimum=0.0)
SWITCHYARD_API_MAX_WAIT_S = env_int("SWITCHYARD_API_MAX_WAIT_S", 60, minimum=0)
# Live streams (SSE) send a heartbeat comment after this many seconds without a frame.
SWITCHYARD_SSE_HEARTBEAT_S = env_float("SWITCHYARD_SSE_HEARTBEAT_S", 15.0, minimum=0.1)
# Stream tokens (jobs/stream_tokens.py): how long a browser's token for one run's stream lives.
SWITCHYARD_STREAM_TOKEN_TTL_S = env_int("SWITCHYARD_STREAM_TOKEN_TTL_S", 300, minimum=1)
SWITCHYARD_PUBLIC_URL = env_str("SWITCHYARD_PUBLIC_URL", "http://127.0.0.1:8000")

# Step kinds
# The provider of llm steps that name none. Development simulates one; a deployment names its
# own (`check --deploy` fails without one, switchyard.E002), so that nobody ships simulated text.
SWITCHYARD_LLM_DEFAULT_PROVIDER = env_str(
    "SWITCHYARD_LLM_DEFAULT_PROVIDER", "simulated" if DEBUG else ""
)
SWITCHYARD_OPENAI_BASE_URL = env_str("SWITCHYARD_OPENAI_BASE_URL", "https://api.openai.com/v1")
SWITCHYARD_OPENAI_API_KEY = env_str("SWITCHYARD_OPENAI_API_KEY", "")
SWITCHYARD_OPENAI_MODEL = env_str("SWITCHYARD_OPENAI_MODEL", "gpt-4o-mini")
SWITCHYARD_OPENAI_TIMEOUT_S = env_float("SWITCHYARD_OPENAI_TIMEOUT_S", 120.0, minimum=1)
SWITCHYARD_ALLOW_PRIVATE_URLS = env_bool("SWITCHYARD_ALLOW_PRIVATE_URLS", False)
SWITCHYARD_HTTP_TOOL_MAX_BYTES = env_int("SWITCHYARD_HTTP_TOOL_MAX_BYTES", 1_048_576, minimum=1)

# Secrets at rest (webhook signing secrets): Fernet keys derived from this comma-separated list
# (the first encrypts, all decrypt); empty means derived from SECRET_KEY. See
# orchestrator/encryption.py.
SWITCHYARD_ENCRYPTION_KEY = env_str("SWITCHYARD_ENCRYPTION_KEY", "")

# Webhooks (jobs/webhooks.py): exponential backoff from BACKOFF_S, capped at MAX_BACKOFF_S, until
# RETRY_WINDOW_S after the first attempt; each POST times out after TIMEOUT_S.
SWITCHYARD_WEBHOOK_BACKOFF_S = env_float("SWITCHYARD_WEBHOOK_BACKOFF_S", 30.0, minimum=0.01)
SWITCHYARD_WEBHOOK_MAX_BACKOFF_S = env_float(
    "SWITCHYARD_WEBHOOK_MAX_BACKOFF_S", 3600.0, minimum=0.01
)
SWITCHYARD_WEBHOOK_RETRY_WINDOW_S = env_float(
    "SWITCHYARD_WEBHOOK_RETRY_WINDOW_S", 86400.0, minimum=0.0
)
SWITCHYARD_WEBHOOK_TIMEOUT_S = env_float("SWITCHYARD_WEBHOOK_TIMEOUT_S", 10.0, minimum=0.1)

# --- API ------------------------------------------------------------------------------------
# Submission: an Idempotency-Key matches the run it created for this long.
SWITCHYARD_IDEMPOTENCY_TTL_S = env_int("SWITCHYARD_IDEMPOTENCY_TTL_S", 86_400, minimum=1)
# Each process caches API keys this long (seconds; 0 = no cache): a key revoked elsewhere is
# refused everywhere within it (and by submissions at once: tenants/keycache.py).
SWITCHYARD_API_KEY_CACHE_S = env_float("SWITCHYARD_API_KEY_CACHE_S", 1.0, minimum=0)
# Backpressure: submission answers 503 once this many steps wait for a worker (ready or queued,
# all active tenants); 429 comes from each tenant's max_queued_runs. Both send Retry-After.
SWITCHYARD_PLATFORM_MAX_BACKLOG = env_int("SWITCHYARD_PLATFORM_MAX_BACKLOG", 100_000, minimum=1)
SWITCHYARD_API_RETRY_AFTER_S = env_int("SWITCHYARD_API_RETRY_AFTER_S", 5, minimum=1)
# Request bodies over this size are refused with 413 (orchestrator/middleware.py); Django's own
# limit on the bodies it reads (forms, the admin) is the same.
SWITCHYARD_API_MAX_BODY_BYTES = env_int("SWITCHYARD_API_MAX_BODY_BYTES", 1_048_576, minimum=1)
DATA_UPLOAD_MAX_MEMORY_SIZE = SWITCHYARD_API_MAX_BODY_BYTES

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["tenants.auth.ApiKeyAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["jobs.api.parsers.StrictJSONParser"],
    "EXCEPTION_HANDLER": "jobs.api.errors.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "UNAUTHENTICATED_USER": None,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Switchyard API",
    "DESCRIPTION": "Run AI-agent workflows asynchronously for many tenants.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    # Docs assets come from drf-spectacular-sidecar's static files: no CDN (the product works
    # offline).
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # validatorUrl null: Swagger UI would otherwise load a badge from an outside validator.
    "SWAGGER_UI_SETTINGS": {"deepLinking": True, "validatorUrl": None},
    # Links between operations (a submission's id opens the run, its events, cancel, retry).
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "jobs.api.openapi.add_links",
    ],
    "ENUM_NAME_OVERRIDES": {
        "RunStatusEnum": "jobs.models.RunStatus",
        "StepStatusEnum": "jobs.models.StepStatus",
        "AttemptOutcomeEnum": "jobs.models.AttemptOutcome",
        "WebhookStatusEnum": "jobs.models.WebhookStatus",
        "LaneEnum": "tenants.models.Lane",
        "ScopeEnum": "tenants.models.Scope",
    },
}

# --- Operators' dashboard and observability (docs/dashboard.md) ------------------------------
# The metric sampler (run by the scheduler) takes a sample this often and keeps this many hours.
SWITCHYARD_METRICS_SAMPLE_S = env_float("SWITCHYARD_METRICS_SAMPLE_S", 10.0, minimum=0.5)
SWITCHYARD_METRICS_RETENTION_H = env_float("SWITCHYARD_METRICS_RETENTION_H", 24.0, minimum=1)
# The housekeeping averages raw samples older than this many hours into one point per minute.
SWITCHYARD_METRICS_ROLLUP_AFTER_H = env_float("SWITCHYARD_METRICS_ROLLUP_AFTER_H", 1.0, minimum=0.1)

# --- Housekeeping (docs/maintenance.md) --------------------------------------------------------
# Each job (retention, metric roll-up, idempotency keys, approvals' notifications) is enqueued by
# the scheduler this often, on the maintenance queue; a run works in batches of BATCH rows (one
# short transaction each) and stops after BUDGET_S seconds, leaving the rest to the next run.
SWITCHYARD_HOUSEKEEPING_INTERVAL_S = env_float(
    "SWITCHYARD_HOUSEKEEPING_INTERVAL_S", 600.0, minimum=1
)
SWITCHYARD_HOUSEKEEPING_BATCH = env_int("SWITCHYARD_HOUSEKEEPING_BATCH", 1000, minimum=1)
SWITCHYARD_HOUSEKEEPING_BUDGET_S = env_float("SWITCHYARD_HOUSEKEEPING_BUDGET_S", 120.0, minimum=1)
# Workers write a heartbeat this often; one silent for DOWN_AFTER_S is shown as down.
SWITCHYARD_WORKER_HEARTBEAT_S = env_float("SWITCHYARD_WORKER_HEARTBEAT_S", 5.0, minimum=0.1)
SWITCHYARD_WORKER_DOWN_AFTER_S = env_float("SWITCHYARD_WORKER_DOWN_AFTER_S", 15.0, minimum=0.5)
# GET /metrics needs `Authorization: Bearer <this>`; empty turns the endpoint off (403).
SWITCHYARD_METRICS_TOKEN = env_str("SWITCHYARD_METRICS_TOKEN", "")
# Live pages re-read the database at least this often (and within ~1 s of any run changing).
SWITCHYARD_DASHBOARD_REFRESH_S = env_float("SWITCHYARD_DASHBOARD_REFRESH_S", 5.0, minimum=0.5)
SWITCHYARD_DASHBOARD_BROKER_TIMEOUT_S = env_float(
    "SWITCHYARD_DASHBOARD_BROKER_TIMEOUT_S", 2.0, minimum=0.1
)
# A bulk retry or cancel acts on at most this many runs (the newest that match).
SWITCHYARD_DASHBOARD_BULK_MAX = env_int("SWITCHYARD_DASHBOARD_BULK_MAX", 500, minimum=1)

# Logs carry tenant, run and step ids (orchestrator/logcontext.py); LOG_FORMAT=json for shippers.
# Celery workers log through this configuration too (they do not replace the root handlers).
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
LOG_FORMAT = env_choice("LOG_FORMAT", "plain", ["plain", "json"])
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"context": {"()": "orchestrator.logcontext.ContextFilter"}},
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s%(context)s"},
        "json": {"()": "orchestrator.logcontext.JsonFormatter"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": LOG_FORMAT,
            "filters": ["context"],
        }
    },
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {
        "django.db.backends": {"level": "WARNING"},
        "celery": {"level": "INFO"},
    },
}
