"""`migrate` without the connection bounds that every other process runs with.

Settings give every connection a lock, idle-in-transaction and statement timeout, so that a
stalled process cannot hold the others (docs/reliability.md). A migration is the exception:
it runs in a transaction whose steps include Python between statements (rendering model
states) and statements that may take long on a large table, and cutting it off halfway would
help no one. Its connection sets the three to 0 (none) for its session before migrating.
"""

from django.core.management.commands.migrate import Command as MigrateCommand
from django.db import connections


class Command(MigrateCommand):
    def handle(self, *args, **options):
        with connections[options["database"]].cursor() as cursor:
            cursor.execute(
                "SET lock_timeout = 0; SET idle_in_transaction_session_timeout = 0; "
                "SET statement_timeout = 0"
            )
        return super().handle(*args, **options)
