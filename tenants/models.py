"""Tenants, their API keys and their members.

A tenant's quotas live on the tenant row so that an admin's edit takes effect at the
scheduler's next cycle without a restart (the scheduler reads them every cycle).
"""

import uuid

from django.conf import settings
from django.core.validators import MinValueValidator
from django.db import models

from tenants.origins import validate_allowed_origins


class Lane(models.TextChoices):
    INTERACTIVE = "interactive", "interactive"
    STANDARD = "standard", "standard"
    BATCH = "batch", "batch"


# Higher number = more urgent. AMQP priorities of the step queues (docs/scheduling.md).
LANE_PRIORITY = {Lane.INTERACTIVE: 9, Lane.STANDARD: 5, Lane.BATCH: 1}
LANE_RANK = {Lane.BATCH: 0, Lane.STANDARD: 1, Lane.INTERACTIVE: 2}


class Tenant(models.Model):
    public_id = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    name = models.CharField(max_length=200)
    slug = models.SlugField(max_length=64, unique=True)
    weight = models.PositiveIntegerField(default=1, help_text="Fair share relative to others.")
    default_lane = models.CharField(max_length=16, choices=Lane.choices, default=Lane.STANDARD)
    max_lane = models.CharField(
        max_length=16,
        choices=Lane.choices,
        default=Lane.INTERACTIVE,
        help_text="The most urgent lane this tenant's runs may ask for.",
    )
    max_concurrent_steps = models.PositiveIntegerField(default=50)
    max_active_runs = models.PositiveIntegerField(default=500)
    max_queued_runs = models.PositiveIntegerField(default=10_000)
    steps_per_minute = models.PositiveIntegerField(default=6_000)
    llm_tokens_per_day = models.PositiveBigIntegerField(default=10_000_000)
    # How long a finished run keeps its event log and attempts (docs/maintenance.md): the
    # housekeeping's retention deletes them after that; the run and its steps stay.
    retention_days = models.PositiveIntegerField(
        default=30,
        validators=[MinValueValidator(1)],
        help_text="Days a finished run keeps its events and attempts before housekeeping "
        "deletes them (the run, its steps and output stay).",
    )
    is_active = models.BooleanField(default=True, help_text="Paused tenants' steps stay ready.")
    # The key that signs this tenant's webhooks, Fernet-encrypted under
    # SWITCHYARD_ENCRYPTION_KEY (`orchestrator.encryption`). It must be readable to sign, so it
    # is encrypted rather than hashed. Written only by `tenants.services`.
    webhook_secret_encrypted = models.TextField(blank=True, editable=False)
    webhook_secret_rotated_at = models.DateTimeField(null=True, blank=True, editable=False)
    # POSTed (signed like run webhooks) on each new approval request, with its inbox link.
    approval_webhook_url = models.URLField(
        max_length=2000,
        blank=True,
        help_text="Notified of each new approval request (signed like run webhooks).",
    )
    # The web pages (their origins) that may follow this tenant's runs from a browser with a
    # stream token: CORS on the streams and the WebSocket origin check (tenants/origins.py).
    allowed_origins = models.JSONField(
        default=list,
        blank=True,
        validators=[validate_allowed_origins],
        help_text="Origins of the tenant's web pages, e.g. https://app.example.com (no path).",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.slug


class Scope(models.TextChoices):
    """What an API key may do beyond the client API (runs, workflows, documents)."""

    ADMIN = "admin", "admin: manage the tenant's API keys and webhook secret"


class ApiKey(models.Model):
    """An API key: `sy_<prefix>_<secret>`. Only a SHA-256 of the whole key is stored.

    SHA-256 (not a slow password hash) is right here: the secret is 32 random bytes, so there
    is nothing to brute-force, and the lookup runs on every request.
    """

    public_id = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16, unique=True, editable=False)
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    scopes = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.name} (sy_{self.prefix}_…)"


class Role(models.TextChoices):
    REVIEWER = "reviewer", "reviewer"
    VIEWER = "viewer", "viewer"


class Membership(models.Model):
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships"
    )
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.VIEWER)
    # Named reviewer groups within the tenant (e.g. ["finance", "leads"]) that an approval
    # step's `reviewers` or `escalate_to` may name besides the `reviewer` role.
    groups = models.JSONField(
        default=list,
        blank=True,
        help_text='Named reviewer groups, e.g. ["finance", "leads"].',
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["user", "tenant"], name="membership_unique_user")
        ]

    def __str__(self) -> str:
        return f"{self.user} @ {self.tenant} ({self.role})"


class TenantUsageDay(models.Model):
    """LLM tokens a tenant used on one UTC day (the `llm_tokens_per_day` quota), as rolled up
    from its `TenantTokenUse` rows. Written only by the scheduler's roll-up (`tenants.quotas`);
    the day's use is this row plus the rows not rolled up yet."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="usage_days")
    day = models.DateField()
    llm_tokens = models.PositiveBigIntegerField(default=0)
    steps_completed = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["-day"]
        constraints = [models.UniqueConstraint(fields=["tenant", "day"], name="usage_unique_day")]

    def __str__(self) -> str:
        return f"{self.tenant} {self.day}"


class TenantThrottle(models.Model):
    """The runtime state of a tenant's steps-per-minute token bucket.

    Kept apart from `Tenant` so that an admin saving the tenant's quotas never overwrites the
    scheduler's bucket (and the other way round).
    """

    tenant = models.OneToOneField(Tenant, on_delete=models.CASCADE, related_name="throttle")
    step_tokens = models.FloatField(default=0)
    refilled_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"{self.tenant}: {self.step_tokens:.1f} tokens"


class TenantTokenUse(models.Model):
    """LLM tokens one step's report used: appended in the step's transaction, never updated.

    A step's transaction must not write a row that every step of the tenant writes (one
    stalled worker holding it would stall them all), so usage is appended here and the
    scheduler rolls it up into `TenantUsageDay` (`tenants.quotas.usage_roll_up`).
    """

    id = models.BigAutoField(primary_key=True)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="token_uses")
    day = models.DateField()
    llm_tokens = models.PositiveBigIntegerField()

    class Meta:
        indexes = [models.Index(fields=["tenant", "day"], name="token_use_tenant_day")]

    def __str__(self) -> str:
        return f"{self.tenant} {self.day}: {self.llm_tokens}"


class TenantThrottleSpend(models.Model):
    """Steps-per-minute tokens that a direct admission spent, appended in its transaction.

    Only the scheduler writes `TenantThrottle` (under the admission lock, outside any step's
    transaction); a worker's or a submission's direct admission appends what it spent here,
    and the scheduler folds these rows into the bucket at its next admission.
    """

    id = models.BigAutoField(primary_key=True)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="throttle_spends")
    step_tokens = models.FloatField()

    class Meta:
        indexes = [models.Index(fields=["tenant"], name="throttle_spend_tenant")]

    def __str__(self) -> str:
        return f"{self.tenant}: {self.step_tokens:g}"
