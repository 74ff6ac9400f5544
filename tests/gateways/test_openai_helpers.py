"""Shared by the gateway tests: start a real gateway process and wait until it serves.

(Named test_openai_* so that it sits with the files it serves; it has no tests itself.)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest

from tests.support import ProcessGroup, free_broker_url, free_port


@dataclass
class Gateway:
    url: str  # http://127.0.0.1:PORT
    broker_url: str

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"

    def sdk(self, api_key: str = "none", **kwargs: object) -> openai.OpenAI:
        # No retries: every status the gateway sends must reach the test as it is.
        return openai.OpenAI(base_url=self.v1, api_key=api_key, max_retries=0, **kwargs)  # type: ignore[arg-type]

    def async_sdk(self, api_key: str = "none", **kwargs: object) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.v1, api_key=api_key, max_retries=0, **kwargs)  # type: ignore[arg-type]


def start_gateway(
    group: ProcessGroup,
    broker_url: str,
    *args: str,
    models: tuple[str, ...] = (),
    timeout: float = 60.0,
    scheme: str = "http",
    verify: object = True,
) -> Gateway:
    """Starts `mesh gateway openai` and waits until /health is 200 and `models` are listed."""
    port = free_port()
    process = group.mesh("gateway", "gateway", "openai", "--broker", broker_url, "--port", str(port), *args)
    gateway = Gateway(f"{scheme}://127.0.0.1:{port}", broker_url)
    deadline = time.monotonic() + timeout
    while True:
        if not process.alive():
            raise RuntimeError(f"the gateway exited:\n{process.output()}")
        try:
            reply = httpx.get(f"{gateway.url}/health", timeout=2.0, verify=verify)  # type: ignore[arg-type]
            if reply.status_code == 200 and set(models) <= set(reply.json()["models"]):
                return gateway
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the gateway did not become ready:\n{process.output()}")
        time.sleep(0.1)


@pytest.fixture(scope="module", name="synthetic_stack")
def synthetic_stack_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ProcessGroup, Gateway]]:
    """Broker, one synthetic worker (fake tokens: the model's speed would only add time) and a gateway,
    shared by a module's tests; every process stops at the end, whatever happened."""
    group = ProcessGroup(tmp_path_factory.mktemp("openai-gateway"))
    try:
        url = free_broker_url()
        group.broker(url)
        group.synthetic_worker(url, "syn-1", models="synthetic,synthetic-alias")
        yield group, start_gateway(group, url, models=("synthetic", "synthetic-alias"))
    except BaseException:
        print(group.dump_logs())
        raise
    finally:
        group.stop_all()


@pytest.fixture(scope="module", name="gateway")
def gateway_fixture(synthetic_stack: tuple[ProcessGroup, Gateway]) -> Gateway:
    return synthetic_stack[1]
