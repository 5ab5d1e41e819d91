"""Workflows and their immutable versions."""

from __future__ import annotations

from typing import Any

from django.db import IntegrityError, transaction
from django.db.models import Max

from jobs.definitions import DefinitionError, Fault, parse_definition
from jobs.models import Workflow, WorkflowVersion
from jobs.selectors import workflow_for
from jobs.steps import agent
from tenants.models import Tenant


def workflow_version_create(*, tenant: Tenant, document: dict[str, Any] | str) -> WorkflowVersion:
    """Validate a definition and store it as the next version of the tenant's workflow.

    Raises DefinitionError with every fault; nothing is stored then. Sub-workflow steps and
    agents' `workflow:<name>` tools must name a workflow the tenant already has (not this one).
    """
    definition = parse_definition(document)
    faults = []
    for index, step in enumerate(definition.document["steps"]):
        called = []  # (path, workflow name)
        if step.get("kind") == "workflow":
            called.append((f"steps[{index}].workflow", step.get("workflow")))
        elif step.get("kind") == agent.KIND:  # an agent's workflow tools
            called.extend(
                (f"steps[{index}].tools[{position}]", tool.removeprefix(agent.WORKFLOW_PREFIX))
                for position, tool in enumerate(step.get("tools", []))
                if tool.startswith(agent.WORKFLOW_PREFIX)
            )
        for path, name in called:
            if name == definition.name:
                faults.append(Fault(path, "a workflow cannot call itself"))
            elif workflow_for(tenant=tenant, name=name) is None:
                faults.append(Fault(path, f"unknown workflow {name!r}"))
    if faults:
        raise DefinitionError(faults)
    for _ in range(3):  # two uploads of the same name at once: retry on the unique version
        try:
            with transaction.atomic():
                workflow, _created = Workflow.objects.get_or_create(
                    tenant=tenant, name=definition.name
                )
                workflow = Workflow.objects.select_for_update().get(pk=workflow.pk)
                latest = workflow.versions.aggregate(n=Max("version"))["n"] or 0
                return WorkflowVersion.objects.create(
                    workflow=workflow, version=latest + 1, definition=definition.document
                )
        except IntegrityError:
            continue
    raise RuntimeError("could not allocate a workflow version after 3 tries")
