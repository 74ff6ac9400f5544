"""The transformers backend with the real default model, on CPU, through real `mesh` processes.

One broker and two workers serve the whole module (starting them costs more
than the tests): worker A batches (the default), worker B runs with
--deterministic. Besides the shared name, each has its own alias, so a test
can address one worker. Outputs are kept short: the machine is small and shared.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import pytest

from mesh.client import MeshClient
from mesh.discovery import expiry_after
from mesh.errors import BadRequestError, ContextLengthError
from mesh.models import DEFAULT_MODEL_NAME, resolve_model
from mesh.protocol import ChatMessage, FinishReason, GenerateRequest
from tests.support import ARTIFACTS, ProcessGroup, free_broker_url, wait_for_workers

pytestmark = [pytest.mark.model, pytest.mark.timeout(240)]

CACHE = ARTIFACTS / "models"


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The default model, converted once per session (and kept across sessions) under the artifacts."""
    return resolve_model(None, str(CACHE)).path


@pytest.fixture(scope="module")
def mesh_url(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = free_broker_url()
    group = ProcessGroup(tmp_path_factory.mktemp("transformers-mesh"))
    try:
        group.broker(url)
        common = ("worker", "--broker", url, "--cache-dir", str(CACHE), "--capacity", "10")
        group.mesh("worker-a", *common, "--worker-id", "a", "--model-names", f"{DEFAULT_MODEL_NAME},tiny-a")
        group.mesh(
            "worker-b",
            *common,
            "--worker-id",
            "b",
            "--model-names",
            f"{DEFAULT_MODEL_NAME},tiny-b",
            "--deterministic",
            "--max-model-len",
            "4096",
        )

        async def ready() -> None:
            async with MeshClient(url) as client:
                await wait_for_workers(client, 2, timeout=150)

        try:
            asyncio.run(ready())
        except TimeoutError:
            print(group.dump_logs())
            raise
        yield url
    finally:
        group.stop_all()


@pytest.fixture
async def client(mesh_url: str) -> AsyncIterator[MeshClient]:
    async with MeshClient(mesh_url, timeout=120) as c:
        yield c


def chat(text: str, **kw: object) -> GenerateRequest:
    kw.setdefault("model", "tiny-a")
    return GenerateRequest(messages=[ChatMessage("user", text)], **kw)  # type: ignore[arg-type]


async def test_greedy_output_equals_transformers_generate(client: MeshClient, model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt = "The three primary colors are"
    done = await client.complete(GenerateRequest(model="tiny-a", prompt=prompt, max_tokens=12, temperature=0))

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    reference = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :].tolist()

    assert done.token_ids, done
    assert done.token_ids == reference[: len(done.token_ids)]
    assert done.text == tokenizer.decode(done.token_ids, skip_special_tokens=True)
    assert done.usage.prompt_tokens == ids.shape[1]


async def test_requests_prefilled_together_match_their_lone_runs(client: MeshClient) -> None:
    # Prompts of different lengths arriving at once are prefilled in one left-padded forward on
    # worker a; worker b (--deterministic) runs each alone. Wrong padding or positions would show.
    prompts = ["Hi", "The capital of France is", "List three animals that live in the sea and say why"]
    together = await asyncio.gather(
        *(client.complete(GenerateRequest(model="tiny-a", prompt=p, max_tokens=12, temperature=0)) for p in prompts)
    )
    for prompt, result in zip(prompts, together, strict=True):
        alone = await client.complete(GenerateRequest(model="tiny-b", prompt=prompt, max_tokens=12, temperature=0))
        assert (result.worker_id, alone.worker_id) == ("a", "b")
        assert result.token_ids == alone.token_ids, prompt


async def test_stop_string_ends_the_output_and_is_not_emitted(client: MeshClient) -> None:
    free = await client.complete(chat("Count from 1 to 10, separated by commas.", max_tokens=24, temperature=0))
    # Stop on a piece of the greedy text that most likely spans tokens: a digit and the comma after it.
    assert "3," in free.text, free.text
    stopped = await client.complete(
        chat("Count from 1 to 10, separated by commas.", max_tokens=24, temperature=0, stop=["3,"])
    )
    assert stopped.finish_reason is FinishReason.STOP
    assert stopped.text == free.text[: free.text.index("3,")]


async def test_same_seed_same_text_serially_and_other_seed_differs(client: MeshClient) -> None:
    request = chat("Hello!", max_tokens=16, temperature=0.8, seed=1)
    first = await client.complete(request)
    again = await client.complete(request)
    other = await client.complete(chat("Hello!", max_tokens=16, temperature=0.8, seed=2))
    assert first.token_ids == again.token_ids and first.text == again.text
    assert other.token_ids != first.token_ids


async def test_same_seed_same_text_among_eight_concurrent_requests(client: MeshClient) -> None:
    request = chat("Write a haiku.", max_tokens=16, temperature=0.8, seed=1, ignore_eos=True)
    alone = await client.complete(request)
    others = [
        chat(f"Tell me about {topic}.", max_tokens=16, temperature=0.8, seed=i, ignore_eos=True)
        for i, topic in enumerate(["cats", "rain", "tea", "rome", "math", "jazz", "snow"])
    ]
    results = await asyncio.gather(*(client.complete(r) for r in [*others[:3], request, *others[3:]]))
    assert results[3].token_ids == alone.token_ids
    assert results[3].text == alone.text


async def test_two_workers_give_the_same_text_for_the_same_seed(client: MeshClient) -> None:
    a = await client.complete(chat("Name a fruit.", model="tiny-a", max_tokens=16, temperature=0.9, seed=42))
    b = await client.complete(chat("Name a fruit.", model="tiny-b", max_tokens=16, temperature=0.9, seed=42))
    assert (a.worker_id, b.worker_id) == ("a", "b")
    assert a.token_ids == b.token_ids and a.text == b.text


async def test_cancel_frees_the_slot(client: MeshClient) -> None:
    def inflight() -> int:
        return next(w.inflight for w in client.workers() if w.worker_id == "b")

    stream = client.generate(chat("Tell me a long story.", model="tiny-b", max_tokens=400, ignore_eos=True))
    async for _ in stream:
        break  # one chunk: the request is running
    await stream.aclose()
    for _ in range(300):
        if inflight() == 0:
            break
        await asyncio.sleep(0.1)
    assert inflight() == 0
    done = await client.complete(chat("Hi", model="tiny-b", max_tokens=4))
    assert done.usage.completion_tokens >= 1


async def test_closing_the_stream_frees_the_engine_row(model_dir: Path) -> None:
    """The engine itself (in this process, the real model): a closed generate() leaves the batch."""
    from mesh.engines import EngineConfig, create_engine

    engine = create_engine(EngineConfig(cache_dir=str(CACHE), capacity=4))
    await engine.start()
    try:
        long = chat("Tell me a long story.", max_tokens=400, ignore_eos=True)
        short = chat("Hi", max_tokens=6, ignore_eos=True, temperature=0)
        stream = engine.generate(long, "long")
        async for _ in stream:
            break
        assert engine.stats().running == 1
        await stream.aclose()
        outputs = [o async for o in engine.generate(short, "short")]  # served while the row is dropped
        assert outputs[-1].finish_reason is FinishReason.LENGTH and outputs[-1].completion_tokens == 6
        assert engine.stats().running == 0 and engine.stats().waiting == 0
        # abort() ends a running request with finish reason ABORT.
        stream = engine.generate(long, "aborted")
        first = await anext(stream)
        await engine.abort("aborted")
        rest = [o async for o in stream]
        assert first.finish_reason is None and rest[-1].finish_reason is FinishReason.ABORT
    finally:
        await engine.stop()


async def test_a_failed_forward_fails_its_own_requests_only(model_dir: Path) -> None:
    """The real engine in this process, with faults injected. The next prefill forward raises (as an
    out-of-memory error would for a long prompt): the newcomer fails, and the request already running goes
    on to the same text it gives alone. Then a decode step raises: its batch's request fails, and the
    engine serves the next one."""
    from mesh.engines import EngineConfig, create_engine
    from mesh.engines.base import EngineError

    engine = create_engine(EngineConfig(cache_dir=str(CACHE), capacity=4))
    await engine.start()
    try:
        running = chat("Tell me a story.", max_tokens=24, ignore_eos=True, temperature=0)
        alone = [o async for o in engine.generate(running, "alone")]
        model = engine._model  # type: ignore[attr-defined]
        faults = []

        def fail_next_prefill(**inputs: object) -> object:
            if inputs["input_ids"].shape[1] > 1 and not faults:  # type: ignore[attr-defined]
                faults.append("prefill")
                raise RuntimeError("injected: out of memory")
            return model(**inputs)

        stream = engine.generate(running, "running")
        first = await anext(stream)
        engine._model = fail_next_prefill  # type: ignore[attr-defined]
        with pytest.raises(EngineError, match="injected"):
            _ = [o async for o in engine.generate(chat("Hi", max_tokens=4), "newcomer")]
        rest = [o async for o in stream]
        assert faults == ["prefill"]
        assert [t for o in [first, *rest] for t in o.token_ids] == [t for o in alone for t in o.token_ids]
        assert rest[-1].finish_reason is FinishReason.LENGTH

        # A failed decode step fails the rows of its batch, and the engine goes on serving.
        def fail_next_decode(**inputs: object) -> object:
            if inputs["input_ids"].shape[1] == 1 and faults == ["prefill"]:  # type: ignore[attr-defined]
                faults.append("decode")
                raise RuntimeError("injected: decode")
            return model(**inputs)

        stream = engine.generate(running, "doomed")
        await anext(stream)
        engine._model = fail_next_decode  # type: ignore[attr-defined]
        with pytest.raises(EngineError, match="injected: decode"):
            _ = [o async for o in stream]
        after = [o async for o in engine.generate(running, "after")]
        assert faults == ["prefill", "decode"]
        assert [t for o in after for t in o.token_ids] == [t for o in alone for t in o.token_ids]
    finally:
        await engine.stop()


async def test_prompt_over_the_context_is_a_clean_error(client: MeshClient) -> None:
    with pytest.raises(BadRequestError) as info:
        await client.complete(chat("Hello", max_tokens=9000))
    message = info.value.message
    assert "9000" in message and "8192" in message


async def test_max_model_len_caps_the_context_a_worker_serves(client: MeshClient) -> None:
    """Worker B runs with --max-model-len 4096 (the model's own is 8192): it says so on the bus and holds
    requests to it; on the name both serve, a request too long for B goes to A."""
    await wait_for_workers(client, 2)
    assert {w.worker_id: w.context_length for w in client.workers()} == {"a": 8192, "b": 4096}
    with pytest.raises(ContextLengthError, match="4096"):
        await client.complete(chat("Hello", model="tiny-b", max_tokens=4500))
    long = chat("Hi", model=DEFAULT_MODEL_NAME, max_tokens=6000, temperature=0, stop=[".", "!", "?", "\n"])
    done = await asyncio.gather(*(client.complete(long) for _ in range(4)))  # spread over both, then moved
    assert {d.worker_id for d in done} == {"a"}


async def test_a_huge_prompt_is_tokenized_without_stalling_the_worker(client: MeshClient) -> None:
    """Tokenizing 4 MB takes seconds. On the worker's event loop it would stop its heartbeats: the broker
    would declare it dead after 1.5 s and fail every other stream it serves."""
    huge = GenerateRequest(model="tiny-a", prompt="item 12 is red. " * 250_000, max_tokens=1)
    beside = asyncio.create_task(client.complete(chat("Count to ten.", max_tokens=40, ignore_eos=True)))
    changes: list[float] = []  # when worker a's announcement (a heartbeat, or a load change) was heard

    async def watch() -> None:
        last = None
        while True:
            seq = next((w.seq for w in client.workers() if w.worker_id == "a"), None)
            if seq != last:
                changes.append(time.monotonic())
                last = seq
            await asyncio.sleep(0.02)

    watcher = asyncio.create_task(watch())
    try:
        with pytest.raises(ContextLengthError):
            await client.complete(huge)
        done = await beside
    finally:
        watcher.cancel()
    assert done.finish_reason is FinishReason.LENGTH and len(done.token_ids) == 40
    assert done.worker_id == "a"  # not buried, then migrated elsewhere
    # Heartbeats every 0.5 s throughout: no silence as long as the one after which a worker is buried.
    gaps = [b - a for a, b in itertools.pairwise(changes)]
    assert gaps and max(gaps) < expiry_after(), gaps


async def test_echo_and_logprobs(client: MeshClient) -> None:
    done = await client.complete(
        GenerateRequest(model="tiny-a", prompt="Paris is", max_tokens=3, temperature=0, echo=True, logprobs=2)
    )
    assert done.text.startswith("Paris is")
    assert len(done.logprobs) == len(done.token_ids) == 3
    for entry in done.logprobs:
        assert entry.logprob <= 0 and len(entry.top) == 2
        assert entry.top[0].token_id == entry.token_id  # greedy: the chosen token is the most likely


async def test_a_long_prompt_is_scored_in_chunks_beside_running_requests(client: MeshClient, model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mesh.engines.transformers_backend import SCORE_CHUNK

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    prompt = " ".join(f"item {i} is {'red' if i % 3 else 'blue'}." for i in range(400))
    ids = tokenizer(prompt)["input_ids"]
    assert len(ids) > 2 * SCORE_CHUNK  # several chunks, over one cache

    greedy = [GenerateRequest(model="tiny-a", prompt=p, max_tokens=8, temperature=0) for p in ("Hi", "Paris is")]
    alone = [await client.complete(r) for r in greedy]
    scoring = GenerateRequest(
        model="tiny-a", prompt=prompt, max_tokens=2, temperature=0, echo=True, logprobs=0, prompt_logprobs=0
    )
    scored, *beside = await asyncio.gather(_chunks(client, scoring), *(client.complete(r) for r in greedy))
    assert [b.token_ids for b in beside] == [a.token_ids for a in alone]  # undisturbed by the scoring forward
    # A reader that falls behind gets the echo and the first token merged into one chunk: join them all.
    text = "".join(chunk.text for chunk in scored)
    entries = [entry for chunk in scored for entry in chunk.logprobs or ()]
    generated = [t for chunk in scored for t in chunk.token_ids]
    assert text.startswith(tokenizer.decode(ids)) and len(generated) == 2
    assert [e.token_id for e in entries] == ids + generated and entries[0].logprob is None
    assert scored[-1].usage is not None and scored[-1].usage.completion_tokens == 2
    prompt_entries = entries[: len(ids)]

    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    with torch.inference_mode():
        expected = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
    chosen = expected[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert torch.allclose(torch.tensor([e.logprob for e in prompt_entries[1:]]), chosen, atol=1e-3)


async def _chunks(client: MeshClient, request: GenerateRequest) -> list:  # type: ignore[type-arg]
    return [chunk async for chunk in client.generate(request)]


async def test_a_migrated_request_continues_after_its_resumed_tokens(client: MeshClient) -> None:
    request = GenerateRequest(
        model="tiny-a", prompt="The three primary colors are", max_tokens=10, temperature=0, ignore_eos=True
    )
    full = await client.complete(request)
    assert len(full.token_ids) == 10
    request.resume_token_ids = full.token_ids[:4]
    request.max_tokens = 6
    rest = await client.complete(request)
    assert rest.token_ids == full.token_ids[4:]
    assert rest.usage.completion_tokens == 10


async def test_a_migrated_seeded_request_samples_what_the_lost_worker_would_have(client: MeshClient) -> None:
    request = GenerateRequest(
        model="tiny-b", prompt="Once upon a time", max_tokens=16, temperature=1.0, seed=11, ignore_eos=True
    )
    full = await client.complete(request)
    assert len(full.token_ids) == 16
    request.resume_token_ids = full.token_ids[:6]
    request.max_tokens = 10
    rest = await client.complete(request)
    assert rest.token_ids == full.token_ids[6:], "the seed's draws must continue, not start again"


async def test_a_migration_releases_the_text_the_lost_worker_held_back(client: MeshClient) -> None:
    """The lost worker streamed some tokens' ids but held their text back (it could begin the stop
    string): after the handover that text still arrives, and a stop string spanning it still stops."""
    base = chat("Write a short poem about the sea.", max_tokens=20, temperature=0)
    words = (await client.complete(base)).text.split(" ")
    request = msgspec.structs.replace(base, stop=[" " + " ".join(words[4:6])])  # a stop of two words or more
    chunks = await _chunks(client, request)
    whole = "".join(chunk.text for chunk in chunks)
    assert chunks[-1].finish_reason is FinishReason.STOP
    ids = [token_id for chunk in chunks for token_id in chunk.token_ids]
    seen, cuts = "", 0
    for count, chunk in enumerate(chunks[:-1], 1):  # the client's view after each delta: its text, the ids
        seen += chunk.text
        done = [token_id for c in chunks[:count] for token_id in c.token_ids]
        resumed = msgspec.structs.replace(
            request, resume_token_ids=done, resume_text_chars=len(seen), max_tokens=20 - len(done)
        )
        rest = await client.complete(resumed)
        assert seen + rest.text == whole, f"after {len(done)} of {len(ids)} tokens"
        assert rest.finish_reason is FinishReason.STOP
        cuts += 1
    assert cuts >= 3


def test_cpu_threads_sets_the_workers_torch_threads(model_dir: Path, processes: ProcessGroup, broker_url: str) -> None:
    processes.broker(broker_url)
    worker = processes.mesh(
        "worker",
        "worker",
        "--broker",
        broker_url,
        "--cache-dir",
        str(CACHE),
        "--worker-id",
        "two-threads",
        "--cpu-threads",
        "2",
    )

    async def scenario() -> None:
        async with MeshClient(broker_url, timeout=120) as client:
            await wait_for_workers(client, 1, timeout=150)
            done = await client.complete(
                GenerateRequest(model=DEFAULT_MODEL_NAME, prompt="The sky is", max_tokens=4, temperature=0)
            )
            assert done.usage.completion_tokens == 4 and done.worker_id == "two-threads"

    asyncio.run(scenario())
    assert "float32 on cpu, 2 thread(s)" in worker.output()
