from django.core.management.base import BaseCommand, CommandError

from tenants.models import Tenant
from tenants.services import tenant_create


class Command(BaseCommand):
    help = "Create a tenant with an API key; prints the key alone on the last line."

    def add_arguments(self, parser):
        parser.add_argument("slug")
        parser.add_argument("--name", default="")
        parser.add_argument("--weight", type=int, default=1)

    def handle(self, *args, slug: str, name: str, weight: int, **options):
        if weight < 1:
            raise CommandError("--weight must be at least 1")
        if Tenant.objects.filter(slug=slug).exists():
            raise CommandError(f"tenant {slug!r} already exists")
        tenant, issued = tenant_create(slug=slug, name=name, weight=weight)
        self.stdout.write(f"Created tenant {tenant.slug} (weight {tenant.weight}).")
        self.stdout.write("Its API key (shown once; it is stored hashed):")
        self.stdout.write(issued.raw_key)
