"""HTTP middleware of the web process.

`RequestBodyLimitMiddleware` refuses a request whose declared body is larger than
`SWITCHYARD_API_MAX_BODY_BYTES` with 413 and the API's error envelope, before any view or
parser reads it. DRF's parsers read the request stream directly, so Django's
`DATA_UPLOAD_MAX_MEMORY_SIZE` (which guards `request.body` and forms) does not cover them;
this check does. A body sent without Content-Length (chunked) is not parsed by DRF at all.

It is both sync- and async-capable: a sync-only middleware would make Django run async views
(waiting, streams) inside a worker thread.
"""

from __future__ import annotations

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.http import HttpRequest, JsonResponse


def payload_too_large(limit: int, declared: int | None = None) -> JsonResponse:
    size = f" ({declared} bytes)" if declared is not None else ""
    return JsonResponse(
        {
            "error": {
                "code": "payload_too_large",
                "message": (
                    f"the request body{size} is larger than the limit of {limit} bytes "
                    "(SWITCHYARD_API_MAX_BODY_BYTES)"
                ),
            }
        },
        status=413,
    )


class RequestBodyLimitMiddleware:
    sync_capable = True
    async_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest):
        if self.is_async:
            return self._acall(request)
        return self._refusal(request) or self.get_response(request)

    async def _acall(self, request: HttpRequest):
        return self._refusal(request) or await self.get_response(request)

    @staticmethod
    def _refusal(request: HttpRequest) -> JsonResponse | None:
        try:
            declared = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return None  # Django and DRF treat a malformed length as no body
        limit = settings.SWITCHYARD_API_MAX_BODY_BYTES
        if declared > limit:
            return payload_too_large(limit, declared)
        return None
