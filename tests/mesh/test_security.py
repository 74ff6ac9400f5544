"""CURVE + ZAP on real processes: who is admitted, who is refused (and logged), live allow-lists.

Workers here run the synthetic engine (fake tokens): these tests are about the mesh's doors, not a model.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import zmq

from mesh.client import MeshClient
from mesh.errors import BrokerUnavailableError, ForbiddenError
from mesh.keys import KeysError, Node, add_nodes, init_keys, plan_nodes
from mesh.protocol import GenerateRequest
from mesh.security import (
    MAX_REFUSED_KEYS_REMEMBERED,
    KeyMaterialError,
    SecurityConfig,
    _AllowList,
    load_broker_keys,
    load_node_keys,
)
from tests.support import REPO_ROOT, ProcessGroup, free_broker_url, mesh_env, wait_for_workers, wait_until


def _mesh(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mesh.cli", *args],
        capture_output=True,
        text=True,
        env=mesh_env(),
        cwd=REPO_ROOT,
        timeout=timeout,
    )


def _keys(root: Path, *names: str) -> SecurityConfig:
    return SecurityConfig(keys_dir=root.joinpath(*names))


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    root = tmp_path / "keys"
    init_keys(root, plan_nodes(2, 1, [], ["gateway"]))
    return root


def test_keys_init_makes_one_folder_per_process(tmp_path: Path) -> None:
    root = tmp_path / "k"
    result = _mesh("keys", "init", str(root), "--workers", "2", "--client", "gateway")
    assert result.returncode == 0, result.stderr
    assert f"--keys {root / 'workers' / 'worker-2'}" in result.stdout
    broker_public, _ = load_broker_keys(root / "broker")
    for folder in ("workers/worker-1", "workers/worker-2", "clients/gateway"):
        public, _, known_broker = load_node_keys(root / folder)
        assert known_broker == broker_public
        role, name = folder.split("/")
        assert (root / "broker" / "allow" / role / f"{name}.key").read_bytes().count(public) == 1
    # A named client replaces the default client-1: no key the user did not ask for is allow-listed.
    assert not (root / "clients" / "client-1").exists()
    assert sorted(p.name for p in (root / "broker" / "allow" / "clients").iterdir()) == ["gateway.key"]
    assert (root / "workers" / "worker-1" / "node.key_secret").stat().st_mode & 0o077 == 0
    # A second init would orphan every node: refused with the way out.
    again = _mesh("keys", "init", str(root))
    assert again.returncode == 2 and "mesh keys add" in again.stderr and "Traceback" not in again.stderr
    # add numbers after the existing nodes.
    added = _mesh("keys", "add", str(root), "--workers", "1")
    assert added.returncode == 0 and "worker-3" in added.stdout


def test_keys_init_numbers_nodes_only_where_no_names_are_given(tmp_path: Path) -> None:
    from mesh.cli import main

    def made(*args: str) -> set[str]:
        root = tmp_path / "_".join(args).replace("-", "") or "plain"
        assert main(["keys", "init", str(root), *args]) == 0
        return {f"{p.parent.name}/{p.name}" for p in root.glob("*/*") if p.parent.name in ("workers", "clients")}

    assert made() == {"workers/worker-1", "clients/client-1"}
    assert made("--worker", "gpu-a", "--client", "gateway") == {"workers/gpu-a", "clients/gateway"}
    assert made("--client", "gateway") == {"workers/worker-1", "clients/gateway"}
    assert made("--client", "gateway", "--clients", "1") == {"workers/worker-1", "clients/client-1", "clients/gateway"}
    assert made("--workers", "0", "--clients", "0") == set()


def test_bad_key_material_is_a_clear_error(tmp_path: Path, keys: Path) -> None:
    with pytest.raises(KeysError, match="listed twice"):
        plan_nodes(0, 0, ["a", "a"], [])
    with pytest.raises(KeysError, match="node name"):
        plan_nodes(0, 0, ["../x"], [])
    with pytest.raises(KeysError, match="exists already"):
        add_nodes(keys, [Node("workers", "worker-1")])
    with pytest.raises(KeyMaterialError, match="node's keys"):
        load_broker_keys(keys / "workers" / "worker-1")
    with pytest.raises(KeyMaterialError, match="broker's keys"):
        load_node_keys(keys / "broker")
    url = free_broker_url()
    result = _mesh("broker", "--broker", url, "--keys", str(keys / "workers" / "worker-1"))
    assert result.returncode == 2 and "DIR/broker" in result.stderr and "Traceback" not in result.stderr
    result = _mesh("status", "--broker", url, "--keys", str(tmp_path / "nowhere"))
    assert result.returncode != 0 and "missing" in result.stderr and "Traceback" not in result.stderr


def test_non_loopback_bind_needs_keys_or_insecure(processes: ProcessGroup, keys: Path) -> None:
    port = free_broker_url().rsplit(":", 1)[1]
    url = f"tcp://0.0.0.0:{port}"
    refused = _mesh("broker", "--broker", url)
    assert refused.returncode == 2
    assert "not a loopback address" in refused.stderr and "--insecure" in refused.stderr
    assert "Traceback" not in refused.stderr
    loopback = f"tcp://127.0.0.1:{port}"
    for extra in (["--insecure"], ["--keys", str(keys / "broker")]):
        broker = processes.broker(url, *extra)
        client_keys = ["--keys", str(keys / "clients" / "client-1")] if "--keys" in extra else []
        wait_until(
            lambda ck=client_keys: _mesh("status", "--broker", loopback, "--timeout", "1", *ck).returncode == 0,
            timeout=20,
            message=f"broker {extra} answering",
        )
        assert broker.alive()
        broker.stop()


def test_revoking_a_key_stops_peers_that_are_already_connected(
    processes: ProcessGroup, broker_url: str, keys: Path
) -> None:
    broker = processes.broker(broker_url, "--keys", str(keys / "broker"))
    processes.synthetic_worker(broker_url, "w1", "--keys", str(keys / "workers" / "worker-1"))
    processes.synthetic_worker(broker_url, "w2", "--keys", str(keys / "workers" / "worker-2"))
    request = GenerateRequest(model="synthetic", prompt="hi", max_tokens=4)

    async def scenario() -> None:
        async with (
            MeshClient(broker_url, security=_keys(keys, "clients", "gateway")) as kept,
            MeshClient(broker_url, security=_keys(keys, "clients", "client-1"), timeout=10) as revoked,
        ):
            await wait_for_workers(kept, 2, timeout=30)
            await revoked.wait_for_broker(10)
            assert (await revoked.complete(request)).usage.completion_tokens == 4
            allow = keys / "broker" / "allow"
            (allow / "clients" / "client-1.key").unlink()
            (allow / "workers" / "worker-2.key").unlink()
            with pytest.raises(ForbiddenError, match="allow-list"):
                await wait_until_raises(lambda: revoked.complete(request), timeout=5)
            for _ in range(100):  # worker-2's announcements are refused: it expires within 1.5 s
                if [w.worker_id for w in kept.workers()] == ["w1"]:
                    break
                await asyncio.sleep(0.1)
            assert [w.worker_id for w in kept.workers()] == ["w1"]
            results = await asyncio.gather(*(kept.complete(request) for _ in range(8)))
            assert {r.worker_id for r in results} == {"w1"}
            # The revoked client no longer hears the bus either (its beacons stop, so the broker
            # looks gone to it); the kept one, reconnected, still does.
            for _ in range(100):
                if not revoked.broker_alive:
                    break
                await asyncio.sleep(0.1)
            assert not revoked.broker_alive and kept.broker_alive
            assert [w.worker_id for w in kept.workers()] == ["w1"]

    asyncio.run(scenario())
    assert "no longer on allow/clients" in broker.output() and "no longer on allow/workers" in broker.output()


async def wait_until_raises(call, timeout: float) -> None:  # type: ignore[no-untyped-def]
    """Repeats `call` until it raises (what it raises propagates), failing after `timeout` s."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        await call()
        await asyncio.sleep(0.1)
    raise AssertionError(f"still accepted after {timeout} s")


def test_curve_admits_listed_keys_only_and_reloads_lists(processes: ProcessGroup, broker_url: str, keys: Path) -> None:
    broker = processes.broker(broker_url, "--keys", str(keys / "broker"))
    processes.synthetic_worker(broker_url, "listed", "--keys", str(keys / "workers" / "worker-1"))
    # worker-2 is revoked before it starts: right broker key, but not on the list.
    (keys / "broker" / "allow" / "workers" / "worker-2.key").unlink()
    processes.synthetic_worker(broker_url, "revoked", "--keys", str(keys / "workers" / "worker-2"))
    # A stranger: keys from another mesh, so the broker's key does not match either.
    other = keys.parent / "other"
    init_keys(other, plan_nodes(1, 1, [], []))
    processes.synthetic_worker(broker_url, "stranger", "--keys", str(other / "workers" / "worker-1"))

    async def scenario() -> None:
        async with MeshClient(broker_url, security=_keys(keys, "clients", "gateway")) as client:
            await client.wait_for_broker(10)
            await wait_for_workers(client, 1, timeout=30)
            completion = await client.complete(GenerateRequest(model="synthetic", prompt="hi", max_tokens=4))
            assert completion.usage.completion_tokens == 4
            # Added while the broker runs: admitted without a restart.
            add_nodes(keys, [Node("workers", "late")])
            processes.synthetic_worker(broker_url, "late", "--keys", str(keys / "workers" / "late"))
            await wait_for_workers(client, 2, timeout=30)
            await asyncio.sleep(1.0)  # the refused ones had every chance to show up
            assert sorted(w.worker_id for w in client.workers()) == ["late", "listed"]
        # A client with unlisted keys, and a client with no keys at all, get no answer.
        for security in (_keys(other, "clients", "client-1"), SecurityConfig()):
            async with MeshClient(broker_url, security=security, connect_timeout=1.5) as stranger:
                with pytest.raises(BrokerUnavailableError):
                    await stranger.complete(GenerateRequest(model="synthetic", prompt="hi", max_tokens=4))
        unlisted = keys.parent / "unlisted"
        shutil.copytree(keys / "clients" / "client-1", unlisted)
        (keys / "broker" / "allow" / "clients" / "client-1.key").unlink()
        async with MeshClient(broker_url, security=SecurityConfig(keys_dir=unlisted), connect_timeout=1.5) as revoked:
            with pytest.raises(BrokerUnavailableError):
                await revoked.wait_for_broker()

    asyncio.run(scenario())
    status = _mesh("status", "--json", "--broker", broker_url, "--keys", str(keys / "clients" / "gateway"))
    assert status.returncode == 0, status.stderr
    assert sorted(w["id"] for w in json.loads(status.stdout)["workers"]) == ["late", "listed"]
    log = broker.output()
    assert "refused a connection on workers" in log
    assert "refused a connection on clients" in log
    assert "CURVE handshake failed" in log  # the plain client, and the one with another mesh's broker key
    assert broker.alive()


def test_a_flood_of_fresh_keys_does_not_grow_the_refusal_log(tmp_path: Path) -> None:
    allow_list = _AllowList("clients", tmp_path)
    for _ in range(5 * MAX_REFUSED_KEYS_REMEMBERED):
        public, _ = zmq.curve_keypair()
        assert not allow_list.callback("clients", public)
    assert allow_list.refusals == 5 * MAX_REFUSED_KEYS_REMEMBERED
    assert allow_list.refused_keys_remembered <= MAX_REFUSED_KEYS_REMEMBERED
