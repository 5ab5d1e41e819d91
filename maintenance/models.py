"""When each housekeeping job is next due: one row per job, advanced by the scheduler that
enqueues it (a compare-and-set, so that several schedulers enqueue a job once)."""

from django.db import models


class HousekeepingTimer(models.Model):
    job = models.CharField(max_length=64, primary_key=True)
    next_at = models.DateTimeField()
    last_enqueued_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["job"]

    def __str__(self) -> str:
        return f"{self.job} next at {self.next_at:%Y-%m-%d %H:%M:%S}"
