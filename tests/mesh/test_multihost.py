"""Several hosts: a broker, two workers and a gateway + client in four network namespaces, CURVE on.

The namespaces hang off a bridge in the broker's namespace through veth pairs, on a private
range (10.213.0.0/24) that exists only inside namespaces this test creates and deletes. The broker
binds a non-loopback address, so it must run with keys. Then one worker's link is cut
(`ip link set ... down`) while requests stream: they fail over to the other worker.
Workers run the SYNTHETIC engine (fake tokens): this is about the network, not a model.
Skipped only where `ip netns` is not permitted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.processes import MESH_CLI, synthetic_worker_command
from mesh.keys import init_keys, plan_nodes
from tests.support import ProcessGroup, wait_until

pytestmark = pytest.mark.timeout(180)

SUBNET = "10.213.0"
BROKER_IP = f"{SUBNET}.1"
PORT = 21001
HOSTS = {"w1": 2, "w2": 3, "cl": 4}  # namespace suffix -> last octet


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


def _netns_permitted() -> str | None:
    """None when namespaces can be made here, else why not."""
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    probe = f"mprobe{uuid.uuid4().hex[:6]}"
    result = _ip("netns", "add", probe, check=False)
    if result.returncode != 0:
        return f"`ip netns add` is not permitted here: {result.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


_SKIP_REASON = _netns_permitted()


class Lab:
    """Four namespaces on one bridge; delete() removes every one of them."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:5]
        self.names = {role: f"mh{tag}{role}" for role in ("br", *HOSTS)}
        self.created: list[str] = []

    def ns(self, role: str) -> str:
        return self.names[role]

    def build(self) -> None:
        br = self.ns("br")
        for name in self.names.values():
            _ip("netns", "add", name)
            self.created.append(name)
            _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", br, "link", "add", "br0", "type", "bridge")
        _ip("-n", br, "addr", "add", f"{BROKER_IP}/24", "dev", "br0")
        _ip("-n", br, "link", "set", "br0", "up")
        for role, octet in HOSTS.items():
            outside, inside = self.link(role), f"e{role}"
            _ip("-n", br, "link", "add", outside, "type", "veth", "peer", "name", inside, "netns", self.ns(role))
            _ip("-n", br, "link", "set", outside, "master", "br0")
            _ip("-n", br, "link", "set", outside, "up")
            _ip("-n", self.ns(role), "addr", "add", f"{SUBNET}.{octet}/24", "dev", inside)
            _ip("-n", self.ns(role), "link", "set", inside, "up")

    @staticmethod
    def link(role: str) -> str:
        return f"v{role}"

    def cut(self, role: str) -> None:
        _ip("-n", self.ns("br"), "link", "set", self.link(role), "down")

    def delete(self) -> None:
        for name in self.created:
            _ip("netns", "del", name, check=False)
        self.created.clear()

    def argv(self, role: str, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(role), *argv]


@pytest.fixture
def lab() -> Iterator[Lab]:
    lab = Lab()
    try:
        lab.build()
        yield lab
    finally:
        lab.delete()


# The client side, run inside the client's namespace: streams, reports, waits for the cut, reports again.
_DRIVER = r"""
import asyncio, json, sys, time
from pathlib import Path
import openai
from mesh.client import MeshClient
from mesh.protocol import GenerateRequest
from mesh.security import SecurityConfig

broker, keys, gateway_port, cut_flag = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])

def say(**fields):
    print(json.dumps(fields), flush=True)

async def main():
    api = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{gateway_port}/v1", api_key="none", max_retries=0)
    async with MeshClient(broker, security=SecurityConfig(keys_dir=keys)) as client:
        await client.wait_for_broker(20)
        while len(client.workers()) < 2:
            await asyncio.sleep(0.05)
        say(event="workers", ids=sorted(w.worker_id for w in client.workers()))
        for _ in range(100):  # the gateway may still be starting
            try:
                reply = await api.chat.completions.create(
                    model="synthetic", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
                break
            except (openai.APIConnectionError, openai.APIStatusError):
                await asyncio.sleep(0.2)
        say(event="gateway", text=reply.choices[0].message.content)

        async def stream(i):
            tokens, worker = 0, None
            request = GenerateRequest(model="synthetic", prompt=f"mh {i}", max_tokens=80, seed=i)
            async for chunk in client.generate(request):
                tokens += len(chunk.token_ids)
                worker = chunk.worker_id or worker
                if tokens == 1:
                    started.append(i)
            return tokens, worker

        started = []
        tasks = [asyncio.create_task(stream(i)) for i in range(8)]
        while len(started) < 8:
            await asyncio.sleep(0.01)
        say(event="streaming")
        while not cut_flag.exists():
            await asyncio.sleep(0.01)
        cut_at = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
        say(event="streams", results=[r if isinstance(r, tuple) else repr(r) for r in results])
        while any(w.worker_id == "w1" for w in client.workers()):
            await asyncio.sleep(0.05)
        say(event="w1_gone", after=round(time.monotonic() - cut_at, 2))
        small = GenerateRequest(model="synthetic", prompt="after", max_tokens=3)
        after = [await client.complete(small) for _ in range(6)]
        say(event="after", workers=sorted({a.worker_id for a in after}))
        reply = await api.chat.completions.create(
            model="synthetic", messages=[{"role": "user", "content": "again"}], max_tokens=3)
        say(event="gateway_after", text=reply.choices[0].message.content)
    await api.close()

asyncio.run(main())
"""


def _events(output: str) -> dict[str, dict[str, object]]:
    events: dict[str, dict[str, object]] = {}
    for line in output.splitlines():
        if line.startswith("{"):
            with_event = json.loads(line)
            events[with_event["event"]] = with_event
    return events


@pytest.mark.skipif(_SKIP_REASON is not None, reason=_SKIP_REASON or "")
def test_four_hosts_with_curve_and_a_cut_link(processes: ProcessGroup, lab: Lab, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    init_keys(keys, plan_nodes(0, 0, ["w1", "w2"], ["driver", "gateway"]))
    url = f"tcp://{BROKER_IP}:{PORT}"
    try:
        broker = processes.start(
            "broker",
            lab.argv("br", *MESH_CLI, "broker", "--broker", f"tcp://0.0.0.0:{PORT}", "--keys", str(keys / "broker")),
        )
        for worker in ("w1", "w2"):
            worker_args = ("--worker-id", worker, "--itl-ms", "40", "--keys", str(keys / "workers" / worker))
            processes.start(
                f"worker-{worker}", lab.argv(worker, *synthetic_worker_command(url, "synthetic", *worker_args))
            )
        processes.start(
            "gateway",
            lab.argv(
                "cl",
                *MESH_CLI,
                "gateway",
                "openai",
                "--broker",
                url,
                "--host",
                "127.0.0.1",
                "--port",
                "8000",
                "--keys",
                str(keys / "clients" / "gateway"),
            ),
        )
        cut_flag = tmp_path / "cut"
        driver = processes.start(
            "driver",
            lab.argv("cl", sys.executable, "-c", _DRIVER, url, str(keys / "clients" / "driver"), "8000", str(cut_flag)),
        )
        wait_until(
            lambda: "streaming" in driver.output() or not driver.alive(),
            timeout=90,
            message="the driver started streaming",
        )
        assert driver.alive(), driver.output()
        lab.cut("w1")  # the broker's side of w1's cable
        cut_flag.touch()
        wait_until(lambda: not driver.alive(), timeout=90, message="the driver finished")
        events = _events(driver.output())
        assert driver.popen.returncode == 0, driver.output()
        assert events["workers"]["ids"] == ["w1", "w2"]
        assert events["gateway"]["text"]
        # Streams that were on w1 moved to w2 from their tokens so far; every one completed.
        assert all(r == [80, "w2"] for r in events["streams"]["results"]), events["streams"]
        assert events["after"]["workers"] == ["w2"]
        assert events["gateway_after"]["text"]
        assert broker.alive()
        # The root namespace never saw this traffic: the address exists only inside the lab.
        assert _ip("-o", "addr", "show", check=False).stdout.count(f"{SUBNET}.") == 0
    finally:
        processes.stop_all()
        for process in processes.processes:
            if process.alive():
                os.kill(process.pid, 9)
        time.sleep(0.1)
