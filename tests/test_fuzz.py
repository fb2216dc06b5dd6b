"""Fuzzing every route from Hearth's own OpenAPI document: no 5xx, nothing off-schema."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks

from models.demo import build_demo_models
from tests.conftest import WEBHOOK_SECRET
from tests.support import Process, hearth_env, start_api, wait_for

pytestmark = pytest.mark.integration

# No 5xx, and nothing that contradicts the document: status codes, content types,
# bodies and headers as documented, and schema-invalid requests refused. (Some
# schema-valid requests are refused too, by limits set at run time: too many
# inputs for HEARTH_MAX_INPUTS, a size beyond a model's own range.)
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
    checks.negative_data_rejection,
]

# Small limits, so that whatever the fuzzer asks for runs in well under a second.
FUZZ_LIMITS = "max_width: 128\nmax_height: 128\nmax_steps: 3\ndefault_steps: 2\nmax_n: 2\n"


@pytest.fixture(scope="module")
def fuzz_url(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("fuzz")
    build_demo_models(root / "models")
    shutil.rmtree(root / "models" / "demo-unet")
    (root / "models" / "demo-dit" / "hearth.yaml").write_text(FUZZ_LIMITS)
    env = hearth_env(
        REDIS_URL=redis_url,
        HEARTH_NAMESPACE=f"fuzz-{root.name}",
        HEARTH_STATE_DIR=str(root / "state"),
        HEARTH_MODELS_DIR=str(root / "models"),
        HEARTH_WEBHOOK_SECRET=WEBHOOK_SECRET,
        HEARTH_WEBHOOK_ATTEMPTS="1",
        HEARTH_MAX_INPUTS="8",
        HEARTH_MAX_INPUT_CHARS="200",
        HEARTH_TORCH_THREADS="1",
        HEARTH_REQUEST_TIMEOUT_S="20",
    )
    worker = Process(["worker"], env, root / "worker.log")
    api, url = start_api(env, root)
    try:
        wait_for(f"{url}/readyz", [worker, api])
        yield url
    finally:
        api.stop()
        worker.stop()


def test_no_route_answers_5xx_or_off_schema(fuzz_url: str) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzz_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=20, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        def check(case: schemathesis.Case) -> None:
            case.call_and_validate(timeout=30, checks=CHECKS)

        check()
