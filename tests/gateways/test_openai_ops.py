"""Operations: API keys, CORS, TLS, body size, /health, /metrics and /openapi.json, on live processes.

The worker runs the synthetic engine (fake tokens, no model): only the gateway's behaviour is tested.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.gateways.test_openai_helpers import (  # noqa: F401 (fixtures)
    Gateway,
    gateway_fixture,
    start_gateway,
    synthetic_stack_fixture,
)
from tests.support import ProcessGroup

MODEL = "synthetic"
HELLO = [{"role": "user", "content": "Hello"}]
KEYS = ("key-one", "key-two")
ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return key, cert


@pytest.fixture(scope="module")
def secure(synthetic_stack: tuple[ProcessGroup, Gateway], certificate: tuple[Path, Path]) -> Iterator[Gateway]:
    """A second gateway on the same mesh: HTTPS, API keys, CORS for one origin, 2 KiB bodies."""
    group, plain = synthetic_stack
    key, cert = certificate
    yield start_gateway(
        group,
        plain.broker_url,
        "--api-keys",
        ",".join(KEYS),
        "--allowed-origins",
        ORIGIN,
        "--allow-credentials",
        "--max-body-size",
        "2K",
        "--ssl-keyfile",
        str(key),
        "--ssl-certfile",
        str(cert),
        scheme="https",
        verify=str(cert),
        models=(MODEL,),
    )


def _sdk(gateway: Gateway, cert: Path, api_key: str) -> openai.OpenAI:
    return gateway.sdk(api_key=api_key, http_client=httpx.Client(verify=str(cert)))


def test_tls_and_api_keys(secure: Gateway, certificate: tuple[Path, Path]) -> None:
    _, cert = certificate
    for key in KEYS:
        reply = _sdk(secure, cert, key).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
        assert reply.choices[0].finish_reason == "length"
    with pytest.raises(openai.AuthenticationError) as info:
        _sdk(secure, cert, "wrong-key").chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        _sdk(secure, cert, "wrong-key").models.list()
    # A key that is not UTF-8 is a wrong key too, not a fault of the gateway.
    garbled = httpx.get(f"{secure.v1}/models", verify=str(cert), headers={"Authorization": b"Bearer \xff\xfe"})
    assert garbled.status_code == 401
    for path in ("/metrics", "/openapi.json", "/v1/models"):
        assert httpx.get(secure.url + path, verify=str(cert)).status_code == 401
    # /health needs no key; plain HTTP to the TLS port does not get through.
    assert httpx.get(secure.url + "/health", verify=str(cert)).status_code == 200
    with pytest.raises(httpx.HTTPError):
        httpx.get(secure.url.replace("https", "http") + "/health")


def test_body_over_the_limit_is_413(secure: Gateway, certificate: tuple[Path, Path]) -> None:
    _, cert = certificate
    client = _sdk(secure, cert, KEYS[0])
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(model=MODEL, prompt="x" * 4096, max_tokens=2)
    assert info.value.status_code == 413
    assert client.completions.create(model=MODEL, prompt="x" * 1000, max_tokens=2).choices


def test_cors(secure: Gateway, certificate: tuple[Path, Path]) -> None:
    _, cert = certificate
    preflight = httpx.options(
        f"{secure.v1}/chat/completions",
        verify=str(cert),
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            # The headers the OpenAI SDKs send from a browser, their own included.
            "Access-Control-Request-Headers": "authorization,content-type,x-stainless-os",
        },
    )
    assert preflight.status_code == 204  # no key needed for a preflight
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert preflight.headers["access-control-allow-credentials"] == "true"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    allowed_headers = preflight.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed_headers and "x-stainless-os" in allowed_headers
    actual = httpx.get(
        f"{secure.v1}/models", verify=str(cert), headers={"Origin": ORIGIN, "Authorization": f"Bearer {KEYS[1]}"}
    )
    assert actual.status_code == 200 and actual.headers["access-control-allow-origin"] == ORIGIN
    stranger = httpx.get(
        f"{secure.v1}/models",
        verify=str(cert),
        headers={"Origin": "https://evil.example", "Authorization": f"Bearer {KEYS[1]}"},
    )
    assert "access-control-allow-origin" not in stranger.headers
    denied = httpx.options(
        f"{secure.v1}/models",
        verify=str(cert),
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
    )
    assert denied.status_code == 403


def test_no_cors_headers_unless_configured(gateway: Gateway) -> None:
    reply = httpx.get(f"{gateway.v1}/models", headers={"Origin": ORIGIN})
    assert reply.status_code == 200 and "access-control-allow-origin" not in reply.headers


def _samples(gateway: Gateway) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    reply = httpx.get(f"{gateway.url}/metrics")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(reply.text)
        for sample in family.samples
    }


def test_metrics(gateway: Gateway) -> None:
    client = gateway.sdk()
    list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5, stream=True))
    client.completions.create(model=MODEL, prompt="a b c", max_tokens=3)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="missing", prompt="x")
    samples = _samples(gateway)

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("mesh_gateway_requests_total", route="/v1/chat/completions", method="POST", status="200") >= 1
    assert value("mesh_gateway_requests_total", route="/v1/completions", method="POST", status="404") >= 1
    assert value("mesh_gateway_errors_total", route="/v1/completions", status="404", type="invalid_request_error") >= 1
    assert value("mesh_gateway_time_to_first_token_seconds_count", model=MODEL) >= 2
    assert value("mesh_gateway_inter_token_latency_seconds_count", model=MODEL) >= 4 + 2
    assert value("mesh_gateway_generated_tokens_total", model=MODEL) >= 8
    assert value("mesh_gateway_generations_in_flight") == 0


def test_health(gateway: Gateway) -> None:
    reply = httpx.get(f"{gateway.url}/health")
    assert reply.status_code == 200
    assert reply.json()["status"] == "ok" and MODEL in reply.json()["models"]


def test_openapi_document_matches_the_validating_models(gateway: Gateway) -> None:
    import schemathesis

    from gateways.openai.schemas import ChatCompletionRequest

    document = httpx.get(f"{gateway.url}/openapi.json").json()
    assert document["openapi"].startswith("3.1")
    assert {"/v1/models", "/v1/models/{model}", "/v1/chat/completions", "/v1/completions", "/health"} <= set(
        document["paths"]
    )
    components = document["components"]["schemas"]
    for schema in components.values():
        jsonschema.Draft202012Validator.check_schema(schema)
    assert set(components["ChatCompletionRequest"]["properties"]) == set(ChatCompletionRequest.model_fields)
    # Real responses conform to the published response schemas.
    client = gateway.sdk()
    checks = {
        "ChatCompletion": client.chat.completions.with_raw_response.create(
            model=MODEL, messages=HELLO, max_tokens=3, n=2
        ).http_response.json(),
        "Completion": client.completions.with_raw_response.create(
            model=MODEL, prompt=["a", "b"], max_tokens=2, echo=True
        ).http_response.json(),
        "ModelList": httpx.get(f"{gateway.v1}/models").json(),
        "ErrorResponse": httpx.get(f"{gateway.v1}/models/missing").json(),
    }
    for name, instance in checks.items():
        schema = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
        jsonschema.Draft202012Validator(schema).validate(instance)
    loaded = schemathesis.openapi.from_url(f"{gateway.url}/openapi.json")
    assert len(list(loaded.get_all_operations())) >= 6
