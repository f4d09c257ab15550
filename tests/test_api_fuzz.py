"""A schema-driven fuzz of the HTTP API: requests built from its own OpenAPI schema (every route and method, path
parameters, request bodies) with values of right and wrong types, hostile paths and the settings' real keys
with random values. No request may get a 5xx answer. Seeded, so a failure replays exactly."""

from __future__ import annotations

import dataclasses
import json
import random
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from api_server import serve_api  # noqa: E402
from conftest import write_shapes_dataset  # noqa: E402
from fake_host import FakeHost  # noqa: E402

from lora_trainer.caption import CaptionOptions  # noqa: E402
from lora_trainer.config import FIELD_GROUPS  # noqa: E402
from lora_trainer.grid import GridPlan  # noqa: E402
from lora_trainer.jobs import JobRunner  # noqa: E402
from lora_trainer.server.queue import JobQueue  # noqa: E402
from lora_trainer.server.routes import PREFIX  # noqa: E402

REQUESTS_PER_ROUTE = 40
HOSTILE_TEXT = ["", " ", "..", "../..", "/etc/passwd", "shapes", "shapes/00.png", "00.png", "%2e%2e", "a" * 300,
                "ünïcødé", "nul\x00byte", "C:\\Windows", "~", "shapes/../..", "-1", "0", "1e999", "null", "train",
                "caption", "grid", "coca", "clip-tags", "skip"]
SETTINGS_KEYS = {"config": sorted(FIELD_GROUPS), "options": [f.name for f in dataclasses.fields(CaptionOptions)],
                 "grid": [f.name for f in dataclasses.fields(GridPlan)]}
"""The real keys of the free-form settings objects, so that the fuzz reaches their validation."""
VALID_SETTINGS = {"config": {"train_data_dir": "shapes"}, "options": {},
                  "grid": {"prompt": "sks", "loras": ["style.safetensors"]}}
"""Settings each kind accepts, which the fuzz mutates: so that it also reaches past validation."""
SETTINGS_OF_KIND = {"train": "config", "caption": "options", "grid": "grid"}


def random_value(rng: random.Random, depth: int = 0) -> Any:
    """A JSON value of any type: edge numbers, hostile strings, nested lists and mappings."""
    kinds = ["none", "bool", "int", "float", "text", "text"] + (["list", "dict"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "none":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "int":
        return rng.choice([0, 1, -1, 2, 7, 32, 10**6, -(2**63), 2**70, rng.randint(-1000, 1000)])
    if kind == "float":
        return rng.choice([0.0, -0.5, 0.5, 1e-4, 1e300, -1e300, rng.uniform(-10, 10)])
    if kind == "text":
        return rng.choice(HOSTILE_TEXT)
    if kind == "list":
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(HOSTILE_TEXT): random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def value_for(schema: dict, components: dict, rng: random.Random, name: str = "") -> Any:
    """A value for `schema`: mostly of its declared type, sometimes of any other."""
    if "$ref" in schema:
        schema = components[schema["$ref"].rsplit("/", 1)[-1]]
    if "anyOf" in schema or "allOf" in schema:
        schema = rng.choice(schema.get("anyOf") or schema["allOf"])
    if rng.random() < 0.15:
        return random_value(rng)
    kind = schema.get("type")
    if name in SETTINGS_KEYS:
        keys = SETTINGS_KEYS[name]
        settings = dict(VALID_SETTINGS[name]) if rng.random() < 0.5 else {}
        settings.update({rng.choice(keys): random_value(rng) for _ in range(rng.randint(0, 2))})
        return settings
    if kind == "object":
        properties = schema.get("properties", {})
        required = set(schema.get("required", []))
        return {key: value_for(sub, components, rng, key) for key, sub in properties.items()
                if key in required or rng.random() < 0.5}
    if kind == "array":
        return [value_for(schema.get("items", {}), components, rng) for _ in range(rng.randint(0, 3))]
    if kind == "string":
        return rng.choice(HOSTILE_TEXT)
    if kind in ("integer", "number"):
        return rng.choice([0, -1, 1, 3, 2**70])
    if kind == "boolean":
        return rng.random() < 0.5
    return random_value(rng)


def job_request(rng: random.Random) -> dict:
    """A job request of a real kind with settings it accepts, one of them mutated half of the time."""
    kind = rng.choice(list(SETTINGS_OF_KIND))
    section = SETTINGS_OF_KIND[kind]
    settings = dict(VALID_SETTINGS[section])
    if rng.random() < 0.5:
        settings[rng.choice(SETTINGS_KEYS[section])] = random_value(rng)
    body = {"kind": kind, section: settings}
    if kind == "caption":
        body["folder"] = rng.choice(["shapes", "shapes", *HOSTILE_TEXT])
    return body


def fuzzed_requests(schema: dict, rng: random.Random):
    """(method, path, body) per route and method of `schema`, `REQUESTS_PER_ROUTE` each; a body is a JSON value,
    or raw bytes that are not JSON."""
    components = schema.get("components", {}).get("schemas", {})
    for path, methods in schema["paths"].items():
        if not path.startswith(PREFIX):
            continue
        for method, operation in methods.items():
            body_schema = (operation.get("requestBody", {}).get("content", {}).get("application/json", {})
                           .get("schema"))
            for _ in range(REQUESTS_PER_ROUTE):
                filled = path
                for parameter in operation.get("parameters", []):
                    if parameter["in"] == "path":
                        value = value_for(parameter.get("schema", {}), components, rng)
                        filled = filled.replace("{" + parameter["name"] + "}", httpx.URL(
                            "/", params={"v": str(value)}).query.decode()[2:] or "x")
                body = None
                if body_schema is not None:
                    body = b"{not json" if rng.random() < 0.05 else value_for(body_schema, components, rng)
                    if body_schema.get("$ref", "").endswith("/JobRequest") and rng.random() < 0.5:
                        body = job_request(rng)
                yield method.upper(), filled, body


@pytest.fixture
def served(tmp_path):
    host = FakeHost(None, tmp_path / "Lora", datasets_dir=tmp_path / "datasets")
    write_shapes_dataset(tmp_path / "datasets" / "shapes")
    (tmp_path / "Lora" / "style.safetensors").write_bytes(b"not weights: the queue is never started")
    # The queue is not started: what the fuzz submits waits, so no job runs (nor downloads a captioner).
    queue = JobQueue(JobRunner(host), host.queue_dir())
    with serve_api(queue, host) as url:
        yield url, queue, tmp_path


def test_no_request_built_from_the_openapi_schema_gets_a_server_error(served):
    url, _, _ = served
    rng = random.Random(18)
    answers: dict[int, int] = {}
    failures = []
    with httpx.Client(base_url=url, timeout=30) as client:
        schema = client.get("/openapi.json").json()
        for method, path, body in fuzzed_requests(schema, rng):
            content = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else None
            answer = client.request(method, path, content=content, headers={"content-type": "application/json"})
            answers[answer.status_code] = answers.get(answer.status_code, 0) + 1
            if answer.status_code >= 500:
                failures.append((method, path, body, answer.status_code, answer.text[:300]))
    assert not failures, failures[:5]
    # The fuzz reached past validation too: some requests were accepted, some refused for each reason.
    assert {200, 201, 403, 404, 422} <= set(answers), answers
