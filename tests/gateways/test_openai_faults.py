"""Faults through the gateway: a client that leaves, a worker that dies mid-stream, a full mesh, no broker.

Fault tests: the workers run the synthetic engine (fake tokens with a fixed
delay between them, no model), so that a request is reliably still running
when the fault is caused.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import httpx
import openai
import pytest

from mesh.client import MeshClient
from tests.gateways.test_openai_helpers import Gateway, start_gateway
from tests.support import ProcessGroup, free_broker_url, free_port, wait_for_workers

MODEL = "synthetic"
HELLO = [{"role": "user", "content": "Hello"}]
SLOW = ("--itl-ms", "50")  # 20 tokens a second: a long request stays in flight


def _in_flight(gateway: Gateway) -> float:
    for line in httpx.get(f"{gateway.url}/metrics").text.splitlines():
        if line.startswith("mesh_gateway_generations_in_flight "):
            return float(line.split()[1])
    raise AssertionError("no in-flight gauge")


async def test_client_disconnect_cancels_on_the_worker(processes: ProcessGroup, broker_url: str) -> None:
    processes.broker(broker_url)
    processes.synthetic_worker(broker_url, "slow", *SLOW)
    gateway = start_gateway(processes, broker_url, models=(MODEL,))
    async with MeshClient(broker_url) as mesh:
        await wait_for_workers(mesh, 1)
        for stream in (True, False):
            body = {"model": MODEL, "messages": HELLO, "max_tokens": 2000, "stream": stream}
            async with httpx.AsyncClient(timeout=30) as http:
                if stream:
                    async with http.stream("POST", f"{gateway.v1}/chat/completions", json=body) as reply:
                        assert reply.status_code == 200
                        async for line in reply.aiter_lines():
                            if line.startswith("data: ") and '"content":" ' in line:
                                break  # a token arrived: leave mid-stream
                else:
                    task = asyncio.create_task(http.post(f"{gateway.v1}/chat/completions", json=body))
                    await _until(lambda: sum(w.inflight for w in mesh.workers()) == 1, 10)
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            # 2000 tokens at 20/s would take 100 s: back to idle within seconds means it was cancelled.
            await _until(lambda: sum(w.inflight for w in mesh.workers()) == 0, 10)
            await _until(lambda: _in_flight(gateway) == 0, 10)


async def _until(predicate, timeout: float) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def test_error_after_streaming_began_is_an_event_then_done(processes: ProcessGroup, broker_url: str) -> None:
    processes.broker(broker_url)
    worker = processes.synthetic_worker(broker_url, "doomed", *SLOW)
    gateway = start_gateway(processes, broker_url, models=(MODEL,))
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 2000, "stream": True}
    events: list[str] = []
    with httpx.stream("POST", f"{gateway.v1}/chat/completions", json=body, timeout=30) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if line:
                events.append(line)
            if len(events) == 3:
                worker.signal(signal.SIGKILL)  # the worker dies with the stream half done
    assert events[-1] == "data: [DONE]"
    assert events[-2].startswith('data: {"error":') and "worker" in events[-2]
    # Through the SDK the same stream raises APIError; and the gateway keeps serving.
    assert httpx.get(f"{gateway.url}/health").status_code == 200
    processes.synthetic_worker(broker_url, "doomed-too", *SLOW)
    _wait_model(gateway)
    client = gateway.sdk()
    stream = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2000, stream=True)
    with pytest.raises(openai.APIError) as info:
        for count, _ in enumerate(stream):
            if count == 2:
                processes.processes[-1].signal(signal.SIGKILL)
    assert "worker" in info.value.message


def _wait_model(gateway: Gateway, timeout: float = 30, served: bool = True) -> None:
    deadline = time.monotonic() + timeout
    while (MODEL in httpx.get(f"{gateway.url}/health").json()["models"]) != served:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_full_mesh_is_429_and_recovers(processes: ProcessGroup, broker_url: str) -> None:
    processes.broker(broker_url, "--max-queue", "0")
    processes.synthetic_worker(broker_url, "one-slot", "--capacity", "1", *SLOW)
    gateway = start_gateway(processes, broker_url, models=(MODEL,))
    client = gateway.sdk()
    started = threading.Event()

    def hog() -> None:
        stream = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=40, stream=True)
        for _ in stream:
            started.set()

    thread = threading.Thread(target=hog)
    thread.start()
    try:
        assert started.wait(20)
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
        with pytest.raises(openai.RateLimitError):
            list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, stream=True))
    finally:
        thread.join(30)
    assert client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2).choices


def test_no_broker_is_503_then_recovers(processes: ProcessGroup) -> None:
    url = free_broker_url()
    process = processes.mesh("gateway", "gateway", "openai", "--broker", url, "--port", str(port := free_port()))
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            health = httpx.get(f"{base}/health")
            break
        except httpx.HTTPError:
            assert process.alive() and time.monotonic() < deadline, process.output()
            time.sleep(0.1)
    assert health.status_code == 503 and health.json()["status"] == "unavailable"
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert info.value.status_code == 503
    assert info.value.response.headers["retry-after"] == "1"  # the SDK's retries wait that long
    # The broker and a worker come up later: the same gateway serves without a restart.
    processes.broker(url)
    worker = processes.synthetic_worker(url, "late")
    _wait_model(Gateway(base, url))
    assert client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2).choices

    # Its only worker stops: a model served before is unavailable (503, retried by the SDK), not unknown.
    worker.stop()
    _wait_model(Gateway(base, url), served=False)
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert info.value.status_code == 503 and info.value.response.headers["retry-after"] == "1"
    assert isinstance(info.value.body, dict) and info.value.body["code"] == "model_unavailable"
    with pytest.raises(openai.NotFoundError):  # a name never served is still unknown
        client.chat.completions.create(model="never-served", messages=HELLO, max_tokens=2)
    processes.synthetic_worker(url, "back")
    _wait_model(Gateway(base, url))
    assert client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2).choices
