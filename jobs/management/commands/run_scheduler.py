from django.core.management.base import BaseCommand

from jobs.scheduler import Scheduler, run_cycle


class Command(BaseCommand):
    help = "Run the scheduler: admit ready steps to RabbitMQ, recover leases and retries."

    def add_arguments(self, parser):
        parser.add_argument("--once", action="store_true", help="Run one cycle and exit.")
        parser.add_argument("--poll", type=float, default=None, help="Polling fallback, s.")

    def handle(self, *args, once: bool = False, poll: float | None = None, **options):
        if once:
            stats = run_cycle()
            self.stdout.write(str(stats))
            return
        scheduler = Scheduler(poll_s=poll)
        scheduler.install_signal_handlers()
        scheduler.run_forever()
