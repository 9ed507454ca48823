"""Schemathesis over the live app's own OpenAPI schema: no request may get a 5xx.

Every operation the app serves at /openapi.json is fuzzed with schema-valid and invalid bodies,
queries and paths, so a route added later is covered without touching this file. Examples are
bounded and seeded, so the run is short and the same every time. The server's model holds only
MAX_MODEL_LEN tokens: a request without a token limit then generates a few dozen tokens, not
thousands (which would measure the tiny model's speed, not the API).

Failures are reported per operation with the request that got the 5xx; the server's traceback is
in the captured log.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from inference.engine import EngineConfig

import pytest
import schemathesis
from schemathesis.checks import not_a_server_error

from tests.fixtures.live_server import TinyServer, make_tiny_services, tiny_server_running

MAX_EXAMPLES = 25  # per operation, for the fuzzing phase (the others are bounded by the schema)
MAX_MODEL_LEN = 96  # prompt + completion, per request
CONFIG = schemathesis.Config.from_dict(
    {
        "seed": 20240601,
        "generation": {
            "mode": "all",  # schema-valid requests and deliberately invalid ones
            "max-examples": MAX_EXAMPLES,
            "database": "none",  # nothing written to .hypothesis/
        },
        "phases": {"stateful": {"enabled": False}},
    }
)


@pytest.fixture(scope="module")
def fuzz_server(
    tiny_llama_path: Path, tiny_bert_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TinyServer]:
    with pytest.MonkeyPatch.context() as env:
        # A module fixture starts before the per-test data dir: keep the engine's caches out of ~.
        env.setenv("RAG_DATA_DIR", str(tmp_path_factory.mktemp("fuzz-data")))
        services = make_tiny_services(
            tiny_llama_path,
            tiny_bert_path,
            engine_config=EngineConfig(max_num_seqs=4, max_model_len=MAX_MODEL_LEN),
        )
        with tiny_server_running(services) as server:
            yield server


@pytest.fixture(scope="module")
def api_schema(fuzz_server: TinyServer) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{fuzz_server.base_url}/openapi.json", config=CONFIG)


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture(autouse=True)
def _node_id_for_schemathesis(request: pytest.FixtureRequest) -> None:
    # schemathesis 4.32 reads `node._nodeid`, which pytest 9.2 no longer has; give it one.
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


@pytest.mark.slow  # about a minute on two cores
@schema.parametrize()
def test_no_operation_answers_with_a_server_error(case: schemathesis.Case) -> None:
    case.call_and_validate(checks=[not_a_server_error], timeout=60)
