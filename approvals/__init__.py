"""Approvals: the requests that `approval` steps make of people, their votes, who may see and
decide them (`access`), every change (`services`), the API, the admin and the reviewers' inbox.

Talks to `jobs` through its models and the public functions of `jobs.transitions`; `jobs` knows
this app through the step registry (`kind`, by dotted paths) and the calls of its worker and
scheduler into `services` (docs/approvals.md).
"""
