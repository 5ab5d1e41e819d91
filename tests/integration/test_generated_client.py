"""Clients generated from the OpenAPI schema by openapi-python-client: one generated here
carries a submit → wait → events round trip against a live server, and the SDK's committed
models are what the generator makes of the schema today."""

from __future__ import annotations

import filecmp
import importlib
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from django.core.management import call_command

ROOT = Path(__file__).resolve().parents[2]
GENERATOR = str(Path(sys.executable).with_name("openapi-python-client"))
SDK_MODELS = ROOT / "clients" / "python" / "src" / "switchyard" / "_generated"
PACKAGE = "generated_switchyard_client"

GREET = {
    "name": "greet",
    "input_schema": {
        "type": "object",
        "required": ["who"],
        "properties": {"who": {"type": "string"}},
    },
    "steps": [{"id": "hello", "kind": "tool", "tool": "echo", "args": {"who": "{{ input.who }}"}}],
    "output": "hello {{ steps.hello.output.args.who }}",
}


def _differences(left: Path, right: Path) -> list[str]:
    comparison = filecmp.dircmp(left, right, ignore=["__pycache__"])
    found = [f"only in one: {name}" for name in comparison.left_only + comparison.right_only]
    found += [str(left / name) for name in comparison.diff_files]
    for name in comparison.common_dirs:
        found += _differences(left / name, right / name)
    return found


def test_the_sdks_generated_models_are_those_of_the_current_schema(tmp_path):
    schema = tmp_path / "schema.yaml"
    call_command("spectacular", "--file", str(schema))
    fresh = tmp_path / "models"
    subprocess.run(
        [
            sys.executable,
            "scripts/generate_sdk_models.py",
            "--schema",
            schema,
            "--destination",
            fresh,
        ],
        cwd=ROOT,
        check=True,
    )
    assert _differences(SDK_MODELS, fresh) == [], (
        "the SDK's models differ from the schema's: run scripts/generate_sdk_models.py"
    )


@pytest.fixture
def generated_client(tmp_path, web):
    """A client generated from the schema the live server serves, importable as PACKAGE."""
    schema = tmp_path / "schema.json"
    answer = httpx.get(f"{web}/api/schema/", headers={"Accept": "application/json"}, timeout=10)
    schema.write_bytes(answer.raise_for_status().content)
    config = tmp_path / "config.yaml"
    config.write_text(f"package_name_override: {PACKAGE}\npost_hooks: []\n")
    out = tmp_path / "client"
    command = [GENERATOR, "generate", "--path", schema, "--meta", "none", "--config", config]
    generated = subprocess.run(
        [*command, "--output-path", out / PACKAGE],
        capture_output=True,
        text=True,
    )
    assert generated.returncode == 0, generated.stdout + generated.stderr
    # The one warning: YAML bodies of POST /workflows/, which a generated client cannot send.
    assert "Unsupported content type" in generated.stdout or "Warning" not in generated.stdout
    sys.path.insert(0, str(out))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(out))
        for name in [name for name in sys.modules if name.startswith(PACKAGE)]:
            del sys.modules[name]


@pytest.mark.cluster
def test_a_generated_client_submits_waits_for_and_reads_a_run(
    generated_client, owner, web, stepping
):
    def operation(tag: str, name: str):
        return importlib.import_module(f"{PACKAGE}.api.{tag}.{name}")

    models = importlib.import_module(f"{PACKAGE}.models")
    client = generated_client.AuthenticatedClient(base_url=web, token=owner.raw_key, timeout=70)

    created = operation("workflows", "workflows_create").sync(
        client=client, body=models.WorkflowsCreateJsonBody.from_dict(GREET)
    )
    assert isinstance(created, models.WorkflowVersionOut) and created.version == 1

    answer = operation("runs", "runs_create").sync_detailed(
        client=client,
        body=models.RunSubmitRequest(
            workflow="greet", input_=models.RunSubmitRequestInput.from_dict({"who": "Ann"})
        ),
        wait=30,
        idempotency_key="generated-1",
    )
    assert answer.status_code == 200, answer.content
    run = answer.parsed
    # The 200 of a ?wait= is typed as the run's detail: output, steps and error included.
    assert isinstance(run, models.RunDetailOut)
    assert run.status == models.RunStatusEnum.SUCCEEDED
    assert run.output == "hello Ann" and run.error is None
    assert [(step.id, step.status) for step in run.steps] == [
        ("hello", models.StepStatusEnum.SUCCEEDED)
    ]

    log = operation("runs", "runs_events_list").sync(client=client, run_id=run.id, after=0)
    assert isinstance(log, models.EventListOut)
    assert [event.seq for event in log.events] == list(range(1, log.last_seq + 1))
    assert log.events[0].type_ == "run.accepted" and log.events[-1].type_ == "run.succeeded"
    assert log.run_status == models.RunStatusEnum.SUCCEEDED

    retrieve = operation("runs", "runs_retrieve")
    refused = retrieve.sync_detailed(client=client, run_id=run.id, wait=-1)
    assert refused.status_code == 400 and isinstance(refused.parsed, models.Error)
    assert refused.parsed.error.code == "invalid_request"
