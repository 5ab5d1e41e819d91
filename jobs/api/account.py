"""The tenant's own settings through the API: its API keys and its webhook signing secret.

Every view here needs a key with the `admin` scope (403 otherwise) and sees only the caller's
tenant: another tenant's key is a 404.
"""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import status
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from jobs.api import openapi
from jobs.api.errors import not_found
from jobs.api.serializers import ApiKeyCreateSerializer, api_key_repr
from jobs.formats import iso
from tenants import selectors
from tenants.auth import HasAdminScope
from tenants.models import Tenant
from tenants.services import (
    api_key_issue,
    api_key_revoke,
    tenant_webhook_secret_ensure,
    tenant_webhook_secret_rotate,
)


class AdminScopeView(APIView):
    permission_classes = [IsAuthenticated, HasAdminScope]

    def tenant(self, request: Request) -> Tenant:
        return request.user.tenant


class ApiKeyListView(AdminScopeView):
    @extend_schema(
        tags=["keys"],
        operation_id="keys_list",
        summary="The tenant's API keys, revoked ones included (never their secrets)",
        responses={200: openapi.ApiKeyListOut, **openapi.errors(403)},
    )
    def get(self, request: Request) -> Response:
        keys = selectors.api_keys_for(tenant=self.tenant(request))
        return Response({"keys": [api_key_repr(key) for key in keys]})

    @extend_schema(
        tags=["keys"],
        operation_id="keys_create",
        summary="Issue an API key; the response carries the whole key, once",
        request=ApiKeyCreateSerializer,
        responses={201: openapi.ApiKeyCreatedOut, **openapi.errors(400, 403, 413)},
    )
    def post(self, request: Request) -> Response:
        body = ApiKeyCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        issued = api_key_issue(
            tenant=self.tenant(request),
            name=body.validated_data["name"],
            scopes=body.validated_data["scopes"],
        )
        return Response(
            {**api_key_repr(issued.api_key), "key": issued.raw_key},
            status=status.HTTP_201_CREATED,
        )


class ApiKeyDetailView(AdminScopeView):
    @extend_schema(
        tags=["keys"],
        operation_id="keys_revoke",
        summary="Revoke an API key (idempotent); requests with it then get 401",
        parameters=[openapi.KEY_ID],
        responses={200: openapi.ApiKeyOut, **openapi.errors(403, 404)},
    )
    def delete(self, request: Request, key_id: str) -> Response:
        api_key = selectors.api_key_for(tenant=self.tenant(request), key_id=key_id)
        if api_key is None:
            raise not_found("API key")
        return Response(api_key_repr(api_key_revoke(api_key=api_key)))


class WebhookSecretView(AdminScopeView):
    @extend_schema(
        tags=["webhooks"],
        operation_id="webhook_secret_retrieve",
        summary="The secret that signs this tenant's webhooks",
        responses={200: openapi.WebhookSecretOut, **openapi.errors(403)},
    )
    def get(self, request: Request) -> Response:
        tenant = self.tenant(request)
        secret = tenant_webhook_secret_ensure(tenant_id=tenant.pk)
        tenant.refresh_from_db(fields=["webhook_secret_rotated_at"])
        return Response({"secret": secret, "rotated_at": iso(tenant.webhook_secret_rotated_at)})


class WebhookSecretRotateView(AdminScopeView):
    @extend_schema(
        tags=["webhooks"],
        operation_id="webhook_secret_rotate",
        summary="Replace the webhook secret; deliveries from now on are signed with the new one",
        request=None,
        responses={200: openapi.WebhookSecretOut, **openapi.errors(403)},
    )
    def post(self, request: Request) -> Response:
        tenant = self.tenant(request)
        secret = tenant_webhook_secret_rotate(tenant=tenant)
        return Response({"secret": secret, "rotated_at": iso(tenant.webhook_secret_rotated_at)})
