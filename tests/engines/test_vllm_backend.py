"""The vLLM backend: its pure decisions, then one real vLLM worker process driven through the mesh.

The worker (`mesh worker --backend vllm`, the default model) serves every
test of the module: vLLM takes 30-60 s to start on a small CPU. The last test
stops it with SIGTERM and checks that no engine process outlives it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import pytest

from mesh.client import Chunk, MeshClient
from mesh.engines.base import EngineConfig, EngineError
from mesh.engines.vllm_backend import (
    CPU_KV_CACHE_BYTES,
    check_context,
    cpu_has_native_bf16,
    engine_arguments,
    finish_reason,
    resolve_dtype,
    sampling_arguments,
    token_logprobs,
)
from mesh.errors import BadRequestError
from mesh.models import DEFAULT_MODEL_NAME
from mesh.protocol import ChatMessage, ErrorCode, FinishReason, GenerateRequest
from tests.support import REPO_ROOT, Process, ProcessGroup, free_broker_url, mesh_env

VLLM_MISSING = importlib.util.find_spec("vllm") is None
#: Start-up of a vLLM worker on a busy 2-core machine: engine core, model load, warm-up.
START_TIMEOUT_S = 240.0
MODEL = DEFAULT_MODEL_NAME


# ---------------------------------------------------------------------- pure decisions (no vLLM needed)


def test_dtype_auto_on_cpu_follows_native_bf16() -> None:
    assert resolve_dtype("auto", "cpu", cpu_has_bf16=True) == "bfloat16"
    assert resolve_dtype("auto", "cpu", cpu_has_bf16=False) == "float32"
    assert resolve_dtype("auto", "cuda", cpu_has_bf16=False) == "auto"  # vLLM picks on GPUs
    assert resolve_dtype("float16", "cpu", cpu_has_bf16=True) == "float16"
    assert cpu_has_native_bf16("flags : fpu avx512f avx512_bf16 amx_tile")
    assert not cpu_has_native_bf16("flags : fpu avx2 avx512f")


def test_engine_arguments_map_the_worker_flags() -> None:
    config = EngineConfig(
        backend="vllm",
        device="cuda",
        capacity=12,
        tensor_parallel_size=2,
        gpu_memory_utilization=0.5,
        max_model_len=2048,
        quantization="awq",
        enforce_eager=True,
        engine_args={"swap_space": 0, "max_model_len": 1024},
    )
    args = engine_arguments(config, "/m", ["a", "b"], "float16", env={})
    assert args == {
        "model": "/m",
        "served_model_name": ["a", "b"],
        "tensor_parallel_size": 2,
        "gpu_memory_utilization": 0.5,
        "max_model_len": 1024,  # --engine-arg wins
        "dtype": "float16",
        "quantization": "awq",
        "enforce_eager": True,
        "max_num_seqs": 12,
        "disable_log_stats": True,
        "swap_space": 0,
    }


def test_engine_arguments_on_cpu_bound_the_kv_cache() -> None:
    config = EngineConfig(backend="vllm")
    args = engine_arguments(config, "/m", ["m"], "bfloat16", env={})
    assert args["kv_cache_memory_bytes"] == CPU_KV_CACHE_BYTES and args["enforce_eager"] is True
    assert "max_model_len" not in args and "quantization" not in args  # unset: vLLM's defaults
    # The user's own setting, by environment or --engine-arg, is kept.
    assert "kv_cache_memory_bytes" not in engine_arguments(config, "/m", ["m"], "bf16", {"VLLM_CPU_KVCACHE_SPACE": "4"})
    config = EngineConfig(backend="vllm", engine_args={"kv_cache_memory_bytes": 5, "enforce_eager": False})
    args = engine_arguments(config, "/m", ["m"], "bfloat16", env={})
    assert args["kv_cache_memory_bytes"] == 5 and args["enforce_eager"] is False


def test_every_seed_stays_a_seed_for_vllm() -> None:
    request = GenerateRequest(model="m", prompt="x")
    assert sampling_arguments(request, seed=None)["seed"] is None
    assert sampling_arguments(request, seed=0)["seed"] == 0
    # vLLM takes -1 for "no seed": negative seeds go as torch's manual_seed would map them.
    assert sampling_arguments(request, seed=-1)["seed"] == 2**64 - 2
    assert sampling_arguments(request, seed=-(2**63))["seed"] == 2**63 - 1


def test_sampling_arguments_carry_every_request_field() -> None:
    request = GenerateRequest(
        model="m",
        prompt="x",
        max_tokens=7,
        temperature=0.0,
        top_p=0.9,
        top_k=5,
        repetition_penalty=1.1,
        presence_penalty=0.2,
        frequency_penalty=0.3,
        stop=["\n"],
        stop_token_ids=[2],
        ignore_eos=True,
        logprobs=3,
    )
    assert sampling_arguments(request, seed=42) == {
        "max_tokens": 7,
        "temperature": 0.0,
        "top_p": 0.9,
        "top_k": 5,
        "repetition_penalty": 1.1,
        "presence_penalty": 0.2,
        "frequency_penalty": 0.3,
        "stop": ["\n"],
        "stop_token_ids": [2],
        "ignore_eos": True,
        "seed": 42,
        "logprobs": 3,
    }
    plain = sampling_arguments(GenerateRequest(model="m", prompt="x"), seed=None)
    assert plain["stop"] is None and plain["stop_token_ids"] is None and plain["top_k"] == 0


def test_context_check_names_the_numbers() -> None:
    check_context(8000, 192, 8192)
    with pytest.raises(EngineError) as caught:
        check_context(8100, 100, 8192)
    assert caught.value.code is ErrorCode.CONTEXT_LENGTH_EXCEEDED
    assert all(str(n) in caught.value.message for n in (8100, 100, 8200, 8192))
    assert "maximum context length is 8192 tokens" in caught.value.message  # OpenAI's words, which tools look for
    with pytest.raises(EngineError, match="empty"):
        check_context(0, 10, 8192)


class _Logprob(NamedTuple):  # the shape of vllm.logprobs.Logprob
    logprob: float
    rank: int | None
    decoded_token: str | None


def test_token_logprobs_keep_the_chosen_token_and_the_top_k() -> None:
    positions = [
        {7: _Logprob(-2.0, 3, " c"), 5: _Logprob(-0.5, 1, " a"), 6: _Logprob(-1.0, 2, " b")},
        {9: _Logprob(-0.1, 1, "!")},
    ]
    first, second = token_logprobs([7, 9], positions, top=2, token_bytes=[])
    assert (first.token_id, first.token, first.logprob) == (7, " c", -2.0)
    assert [(t.token_id, t.logprob) for t in first.top] == [(5, -0.5), (6, -1.0)]
    assert (second.token_id, second.token, [t.token_id for t in second.top]) == (9, "!", [9])
    assert token_logprobs([9], positions[1:], top=0, token_bytes=[])[0].top == []
    assert finish_reason("length") is FinishReason.LENGTH and finish_reason("abort") is FinishReason.ABORT
    assert finish_reason("stop") is FinishReason.STOP and finish_reason(None) is FinishReason.STOP


_REAPED_PARENT = """
import subprocess, sys, time
from mesh.engines.vllm_backend import start_reaper
reaper = start_reaper(__import__("os").getpid())
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
time.sleep(2.5)  # the reaper has seen the child
print(child.pid, reaper.pid, flush=True)
time.sleep(120)
"""


def test_reaper_kills_the_engine_processes_of_a_killed_worker() -> None:
    """kill -9 on a worker skips stop(): the reaper ends what it had started (here a stand-in child)."""
    parent = subprocess.Popen(
        [sys.executable, "-c", _REAPED_PARENT], stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT, env=mesh_env()
    )
    try:
        assert parent.stdout is not None
        child_pid, reaper_pid = map(int, parent.stdout.readline().split())
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while _pid_alive(child_pid) or _pid_alive(reaper_pid):
            assert time.monotonic() < deadline, "the orphaned child or the reaper is still running"
            time.sleep(0.05)
    finally:
        parent.kill()
        parent.wait()


def _pid_alive(pid: int) -> bool:
    """Running, and not a zombie waiting for a parent that is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# ---------------------------------------------------------------------- a real vLLM worker


@dataclass
class VllmMesh:
    url: str
    group: ProcessGroup
    worker: Process


async def _wait_until_served(url: str, worker: Process) -> None:
    async with MeshClient(url) as client:
        deadline = time.monotonic() + START_TIMEOUT_S
        while MODEL not in client.models():
            if not worker.alive():
                raise RuntimeError(f"the vLLM worker exited during start-up:\n{worker.output()[-4000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the vLLM worker did not serve {MODEL} within {START_TIMEOUT_S:.0f} s")
            await asyncio.sleep(0.2)


@pytest.fixture(scope="module")
def vllm_mesh(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmMesh]:
    if VLLM_MISSING:
        pytest.skip("vLLM is not installed")
    url = free_broker_url()
    group = ProcessGroup(tmp_path_factory.mktemp("vllm-mesh"))
    failures = request.session.testsfailed
    try:
        group.broker(url)
        worker = group.mesh(
            "worker-vllm", "worker", "--broker", url, "--backend", "vllm", "--capacity", "8", "--worker-id", "vllm-1"
        )
        asyncio.run(_wait_until_served(url, worker))
        yield VllmMesh(url, group, worker)
    finally:
        group.stop_all()
        if request.session.testsfailed > failures:
            print(group.dump_logs())


async def _stream(url: str, request: GenerateRequest) -> list[Chunk]:
    async with MeshClient(url, timeout=60) as client:
        return [chunk async for chunk in client.generate(request)]


def _chat(text: str, **fields: object) -> GenerateRequest:
    return GenerateRequest(model=MODEL, messages=[ChatMessage("user", text)], **fields)  # type: ignore[arg-type]


def _text(chunks: list[Chunk]) -> str:
    return "".join(chunk.text for chunk in chunks)


@pytest.mark.vllm
def test_streamed_deltas_join_to_the_full_text(vllm_mesh: VllmMesh) -> None:
    from transformers import AutoTokenizer

    from mesh.models import resolve_model

    chunks = asyncio.run(_stream(vllm_mesh.url, _chat("Name three colours.", temperature=0, max_tokens=24)))
    assert len(chunks) >= 2, "expected one delta per engine step, not one block"
    final = chunks[-1]
    assert final.finish_reason in (FinishReason.STOP, FinishReason.LENGTH) and final.usage is not None
    token_ids = [t for chunk in chunks for t in chunk.token_ids]
    assert final.usage.completion_tokens == len(token_ids) > 0 and final.usage.prompt_tokens > 5
    assert final.worker_id == "vllm-1"
    # The incremental text is exactly the decoding of all the tokens (no lost spaces, no broken UTF-8).
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(None).path, local_files_only=True)
    assert _text(chunks) == tokenizer.decode(token_ids, skip_special_tokens=True)
    # Greedy is greedy: the same request again gives the same tokens.
    again = asyncio.run(_stream(vllm_mesh.url, _chat("Name three colours.", temperature=0, max_tokens=24)))
    assert [t for chunk in again for t in chunk.token_ids] == token_ids


@pytest.mark.vllm
def test_seed_reproduces_the_text(vllm_mesh: VllmMesh) -> None:
    def run(seed: int) -> str:
        return _text(asyncio.run(_stream(vllm_mesh.url, _chat("Hello!", seed=seed, temperature=1.0, max_tokens=24))))

    first, second, other = run(1), run(1), run(2)
    assert first == second
    assert first != other


@pytest.mark.vllm
def test_stop_string_echo_and_logprobs(vllm_mesh: VllmMesh) -> None:
    prompt = "The capital of France is"
    base = GenerateRequest(model=MODEL, prompt=prompt, temperature=0, max_tokens=16, ignore_eos=True)
    greedy = _text(asyncio.run(_stream(vllm_mesh.url, base)))
    words = greedy.split()
    assert len(words) >= 3, greedy
    stop = words[2]
    cut = asyncio.run(_stream(vllm_mesh.url, GenerateRequest(**{**_fields(base), "stop": [stop]})))
    assert _text(cut) == greedy[: greedy.index(stop)] and cut[-1].finish_reason is FinishReason.STOP

    echoed = asyncio.run(_stream(vllm_mesh.url, GenerateRequest(**{**_fields(base), "echo": True, "logprobs": 2})))
    assert _text(echoed) == prompt + greedy  # a slow reader may get the echo and tokens in one chunk
    logprobs = [lp for chunk in echoed for lp in chunk.logprobs or ()]
    token_ids = [t for chunk in echoed for t in chunk.token_ids]
    assert [lp.token_id for lp in logprobs] == token_ids
    for lp in logprobs:
        assert lp.logprob <= 0 and 1 <= len(lp.top) <= 2
        assert lp.top == sorted(lp.top, key=lambda t: -t.logprob)
        assert lp.logprob == lp.top[0].logprob  # greedy picks a most likely token (bf16 may tie)


@pytest.mark.vllm
def test_echo_scores_the_prompt(vllm_mesh: VllmMesh) -> None:
    from transformers import AutoTokenizer

    from mesh.models import resolve_model

    prompt = "The capital of France is Paris. The capital of France is"
    request = GenerateRequest(model=MODEL, prompt=prompt, max_tokens=0, echo=True, prompt_logprobs=1)
    chunks = asyncio.run(_stream(vllm_mesh.url, request))
    assert _text(chunks) == prompt
    final = chunks[-1]
    assert final.finish_reason is FinishReason.LENGTH and final.usage is not None
    assert final.usage.completion_tokens == 0 and [t for chunk in chunks for t in chunk.token_ids] == []
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(None).path, local_files_only=True)
    entries = [entry for chunk in chunks for entry in chunk.logprobs or ()]
    assert [e.token_id for e in entries] == tokenizer(prompt)["input_ids"] and final.usage.prompt_tokens == len(entries)
    assert entries[0].logprob is None
    for entry in entries[1:]:
        assert entry.logprob is not None and len(entry.top) == 1 and entry.logprob <= entry.top[0].logprob + 1e-3
    # The repeated clause is predictable the second time.
    half = len(entries) // 2
    assert sum(e.logprob or 0 for e in entries[half + 1 :]) > sum(e.logprob or 0 for e in entries[1 : half + 1])


def _fields(request: GenerateRequest) -> dict[str, object]:
    return {name: getattr(request, name) for name in request.__struct_fields__}


@pytest.mark.vllm
def test_a_migrated_request_continues_after_its_tokens(vllm_mesh: VllmMesh) -> None:
    base = GenerateRequest(model=MODEL, prompt="Once upon a time", temperature=0, max_tokens=12, ignore_eos=True)
    first = asyncio.run(_stream(vllm_mesh.url, base))
    produced = [t for chunk in first for t in chunk.token_ids]
    moved = GenerateRequest(**{**_fields(base), "resume_token_ids": produced[:6], "max_tokens": 6, "echo": True})
    resumed = asyncio.run(_stream(vllm_mesh.url, moved))
    assert all(chunk.token_ids for chunk in resumed[:-1]), "no echo: the client has already shown the prompt"
    assert len([t for chunk in resumed for t in chunk.token_ids]) == 6
    final, usage = resumed[-1], resumed[-1].usage
    assert usage is not None and first[-1].usage is not None
    assert final.finish_reason is FinishReason.LENGTH and usage.completion_tokens == 12
    assert usage.prompt_tokens == first[-1].usage.prompt_tokens


@pytest.mark.vllm
def test_a_migration_releases_the_text_the_lost_worker_held_back(vllm_mesh: VllmMesh) -> None:
    """The lost worker held back text that could begin the stop string: after the handover it still
    arrives, and the stop string spanning the handover still stops."""
    base = _chat("Write a short poem about the sea.", temperature=0, max_tokens=20)
    words = _text(asyncio.run(_stream(vllm_mesh.url, base))).split(" ")
    request = GenerateRequest(**{**_fields(base), "stop": [" " + " ".join(words[4:6])]})
    chunks = asyncio.run(_stream(vllm_mesh.url, request))
    whole = _text(chunks)
    assert chunks[-1].finish_reason is FinishReason.STOP
    for cut in range(1, len(chunks) - 1):
        done = [t for chunk in chunks[:cut] for t in chunk.token_ids]
        shown = len(_text(chunks[:cut]))
        fields = {"resume_token_ids": done, "resume_text_chars": shown, "max_tokens": 20 - len(done)}
        moved = GenerateRequest(**{**_fields(request), **fields})
        rest = asyncio.run(_stream(vllm_mesh.url, moved))
        assert _text(chunks[:cut]) + _text(rest) == whole, f"after {len(done)} tokens"
        assert rest[-1].finish_reason is FinishReason.STOP


@pytest.mark.vllm
def test_a_migrated_request_ends_on_a_stop_token_as_an_unmoved_one_does(vllm_mesh: VllmMesh) -> None:
    """A stop token is counted but its text is not sent, after a migration as before one."""
    base = _chat("Write a short poem about the sea.", temperature=0, max_tokens=20)
    stop_id = [t for chunk in asyncio.run(_stream(vllm_mesh.url, base)) for t in chunk.token_ids][5]
    request = GenerateRequest(**{**_fields(base), "stop_token_ids": [stop_id]})
    chunks = asyncio.run(_stream(vllm_mesh.url, request))
    assert chunks[-1].finish_reason is FinishReason.STOP
    done = [t for chunk in chunks[:2] for t in chunk.token_ids]
    fields = {"resume_token_ids": done, "resume_text_chars": len(_text(chunks[:2])), "max_tokens": 20 - len(done)}
    rest = asyncio.run(_stream(vllm_mesh.url, GenerateRequest(**{**_fields(request), **fields})))
    assert _text(chunks[:2]) + _text(rest) == _text(chunks)
    assert rest[-1].finish_reason is FinishReason.STOP
    assert rest[-1].usage is not None and rest[-1].usage.completion_tokens == chunks[-1].usage.completion_tokens  # type: ignore[union-attr]


@pytest.mark.vllm
def test_cancel_frees_the_slot(vllm_mesh: VllmMesh) -> None:
    long = GenerateRequest(model=MODEL, prompt="Count: 1, 2,", max_tokens=4000, ignore_eos=True, temperature=0)

    async def scenario() -> None:
        async with MeshClient(vllm_mesh.url, timeout=60) as client:
            await client.wait_for_broker(5)
            received = 0
            async for chunk in client.generate(long):
                received += len(chunk.token_ids)
                if received >= 3:
                    # Load changes are announced at most every 50 ms: wait for the one that counts this request.
                    deadline = time.monotonic() + 5
                    while (w := client.models()[MODEL][0]).inflight != 1:
                        assert time.monotonic() < deadline, f"the request never showed as load: {w}"
                        await asyncio.sleep(0.02)
                    break  # leaving the loop cancels the request down to the engine
            deadline = time.monotonic() + 30
            while (w := client.models()[MODEL][0]).inflight or w.waiting:
                assert time.monotonic() < deadline, f"the slot was not freed: {w}"
                await asyncio.sleep(0.05)
            # The freed slot serves the next request.
            done = await client.complete(_chat("Hi", max_tokens=4, temperature=0))
            assert done.usage.completion_tokens >= 1

    asyncio.run(scenario())
    status = subprocess.run(
        [sys.executable, "-m", "mesh.cli", "status", "--broker", vllm_mesh.url, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=mesh_env(),
        cwd=REPO_ROOT,
        check=True,
    )
    (worker,) = json.loads(status.stdout)["workers"]
    assert worker["backend"] == "vllm" and worker["inflight"] == 0 and worker["capacity"] == 8


@pytest.mark.vllm
def test_prompt_over_the_context_is_a_bad_request(vllm_mesh: VllmMesh) -> None:
    too_long = GenerateRequest(model=MODEL, prompt_token_ids=[28] * 8180, max_tokens=64)
    with pytest.raises(BadRequestError) as caught:
        asyncio.run(_stream(vllm_mesh.url, too_long))
    assert "8180" in caught.value.message and "8192" in caught.value.message
    # The worker is unharmed.
    assert _text(asyncio.run(_stream(vllm_mesh.url, _chat("Hi", max_tokens=3, temperature=0))))


@pytest.mark.vllm
def test_sigterm_leaves_no_engine_process(vllm_mesh: VllmMesh) -> None:
    """Last in the module: it stops the shared worker."""
    worker = vllm_mesh.worker
    worker.signal(signal.SIGTERM)
    worker.popen.wait(timeout=60)
    assert worker.popen.returncode == 0, worker.output()[-3000:]
    # The worker ran in its own session: vLLM's engine core and its workers shared its process group.
    deadline = time.monotonic() + 10
    while _group_alive(worker.pid):
        assert time.monotonic() < deadline, "a vLLM process outlived the worker"
        time.sleep(0.1)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
