"""`--backend transformers`: a Hugging Face causal LM with continuous batching, CPU or CUDA.

One engine loop (an asyncio task) owns the model. Each iteration it drops
requests that finished or were cancelled, runs one decode step for every
running request together, then prefills the requests that arrived (together,
in one left-padded forward) and merges them into the running batch. The
blocking torch work runs on one dedicated thread, so the worker's event loop
keeps serving sockets meanwhile. A request therefore joins at the next step
and leaves as soon as it is done; `--capacity` bounds the batch.

KV cache: see `mesh.engines.batching` (left-padded rows, explicit positions,
rows dropped and columns trimmed as requests leave).

Reproducibility: each request samples on its own seeded CPU generator
(`mesh.engines.sampling`), so the same seed gives the same tokens whenever its
logits are the same. In a batch, padding and batch size can change float
rounding in the forward pass; `--deterministic` runs every request's forward
alone (its own batch of one), which makes its logits, and so its tokens,
bitwise those of a lone run, at a throughput cost.

Outputs: each step appends to a per-request pending delta; the request's
consumer takes whatever has accumulated, so a slow consumer receives several
tokens in one output instead of holding the batch back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from mesh.engines import sampling
from mesh.engines.base import (
    Engine,
    EngineConfig,
    EngineError,
    EngineOutput,
    EngineStats,
    capped_context,
    context_exceeded,
    encode_off_loop,
    fit_to_context,
    given_token_ids,
)
from mesh.engines.batching import BatchState, prefill_inputs
from mesh.engines.stop import TextStream
from mesh.engines.vocabulary import raw_of, token_bytes_table
from mesh.models import ModelError, resolve_model
from mesh.protocol import ErrorCode, FinishReason, GenerateRequest, TokenLogprob

log = logging.getLogger("mesh.engines.transformers")

#: Padded tokens (rows x longest prompt) one prefill forward may hold; more joiners are split.
MAX_PREFILL_TOKENS = 4096
#: Prompt positions scored per forward for prompt logprobs: bounds the logits held at once
#: (positions x vocabulary floats: 512 x 49152 x 4 bytes = 100 MB for the default model).
SCORE_CHUNK = 512
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: Device types besides cpu that this backend can run on, each with torch's module that says whether one is here.
_ACCELERATORS = {"cuda": torch.cuda, "mps": torch.mps, "xpu": torch.xpu}


def check_device(name: str) -> torch.device:
    """The torch device `--device` names, if this machine has it; a ValueError saying why not otherwise.

    Checked before the model loads: torch itself fails only at the first tensor moved, after the whole
    load, and with a traceback."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cpu":
        return device
    module = _ACCELERATORS.get(device.type)
    if module is None:
        raise ValueError(f"--device {name}: the transformers backend runs on cpu, cuda, mps or xpu only")
    if not module.is_available():
        raise ValueError(f"--device {name}: torch {torch.__version__} finds no usable {device.type} device here")
    count = module.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(f"--device {name}: there are only {count} {device.type} device(s), numbered from 0")
    return device


@dataclass(eq=False)
class _Sequence:
    """One request's state. The engine loop (and its thread) write it; the consumer reads `pending`."""

    request_id: str
    prompt_ids: list[int]
    #: What the prefill runs: the prompt, plus the tokens of a migrated request's earlier worker.
    prefill_ids: list[int]
    #: Length of output_ids at which the request is done (resumed tokens count, as in usage).
    limit: int
    params: sampling.SamplingParams
    generator: torch.Generator
    counts: sampling.TokenCounts | None
    text: TextStream
    stop_ids: frozenset[int]
    output_ids: list[int] = field(default_factory=list)
    batch: BatchState | None = None
    pending: EngineOutput = field(default_factory=EngineOutput)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    finished: bool = False
    cancelled: bool = False
    #: Set when a step failed; the consumer raises it as an internal error.
    error: str | None = None
    #: Echo with prompt logprobs: alternatives per prompt token, the echo output held back until
    #: the engine thread has scored the prompt, and the scores it wrote.
    prompt_top: int | None = None
    echo: EngineOutput | None = None
    prompt_logprobs: list[TokenLogprob] | None = None


@dataclass(slots=True)
class _Token:
    """What the step thread decided for one sequence in one step."""

    seq: _Sequence
    token_id: int
    logprob: TokenLogprob | None = None


#: Requests a step failed for, and why. The reason is text: an exception kept would keep its traceback's
#: frames, and with them the failed forward's tensors (the memory whose lack may have been the fault).
_Failure = tuple[list[_Sequence], str]


class TransformersEngine(Engine):
    backend = "transformers"
    supports_resume = True

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self._names: list[str] = []
        self._context_length = 0
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._by_id: dict[str, _Sequence] = {}
        self._batches: list[BatchState] = []
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def model_names(self) -> list[str]:
        return self._names

    @property
    def context_length(self) -> int:
        return self._context_length

    async def start(self) -> None:
        # One thread does all torch work: the model is not shared between threads.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="transformers-engine")
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._load)
        self._loop_task = asyncio.create_task(self._engine_loop(), name="transformers-engine-loop")

    def _load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # Both checked before anything loads: the CLI prints a ValueError as one line.
        device = check_device(self.config.device)
        if self.config.dtype != "auto" and self.config.dtype not in _DTYPES:
            raise ValueError(f"--dtype {self.config.dtype!r}: choose auto, {', '.join(_DTYPES)}")
        try:
            resolved = resolve_model(self.config.model_path, self.config.cache_dir)
        except ModelError as exc:
            raise SystemExit(f"mesh worker: {exc}") from None
        if device.type == "cpu":
            # One intra-op thread unless told otherwise: the worker shares its cores with the broker,
            # gateways and other workers, and torch's spinning thread pool degrades badly when
            # oversubscribed (measured on 2 busy cores: a 16-row decode step took 0.54 s on 1 thread
            # and 5.6 s on 2).
            torch.set_num_threads(self.config.cpu_threads)
        dtype = _DTYPES.get(self.config.dtype, "auto")  # checked above: only "auto" is not a key
        started = time.monotonic()
        self._tokenizer = AutoTokenizer.from_pretrained(resolved.path, local_files_only=True)
        self._token_bytes = token_bytes_table(self._tokenizer)
        model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=dtype, local_files_only=True)
        self._model = model.to(device).eval()
        self._device = device
        threads = f", {torch.get_num_threads()} thread(s)" if device.type == "cpu" else ""
        log.info(
            "loaded %s in %.1f s (%s on %s%s)", resolved.path, time.monotonic() - started, model.dtype, device, threads
        )
        self._names = list(self.config.model_names or resolved.default_names)
        model_config = model.config
        self._context_length = capped_context(
            int(getattr(model_config, "max_position_embeddings", 0) or 0), self.config.max_model_len
        )
        self._vocab_size = int(model_config.vocab_size)
        eos = set()
        for source in (getattr(model.generation_config, "eos_token_id", None), self._tokenizer.eos_token_id):
            if isinstance(source, int):
                eos.add(source)
            elif source:
                eos.update(int(i) for i in source)
        self._eos_ids = frozenset(eos)

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        for seq in list(self._by_id.values()):
            self._finish(seq, FinishReason.ABORT)
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def stats(self) -> EngineStats:
        # Rows that finished or were cancelled leave at the next step; they no longer count.
        running = sum(1 for s in self._running if not (s.finished or s.cancelled))
        return EngineStats(running=running, waiting=sum(1 for s in self._waiting if not s.cancelled))

    # ------------------------------------------------------------------ requests

    async def generate(self, request: GenerateRequest, request_id: str) -> AsyncIterator[EngineOutput]:
        problem = sampling.validate(request)
        if problem:
            raise EngineError(ErrorCode.BAD_REQUEST, problem)
        seq = self._admit(request, request_id, await self._prompt_ids(request))
        try:
            if request.echo and not request.resume_token_ids:
                echo = EngineOutput(text=self._prompt_text(seq.prompt_ids))
                if seq.prompt_top is None:
                    yield echo
                else:  # it goes out with the prompt's logprobs, once the engine thread has scored it
                    seq.echo = echo
            if seq.finished:  # max_tokens 0, nothing to score
                output, seq.pending = seq.pending, EngineOutput()
                yield output
                return
            self._waiting.append(seq)
            self._wake.set()
            while True:
                await seq.ready.wait()
                seq.ready.clear()
                if seq.error is not None:
                    raise EngineError(ErrorCode.INTERNAL, seq.error)
                if seq.echo is not None and seq.prompt_logprobs is not None:
                    echo, seq.echo = seq.echo, None
                    echo.logprobs = seq.prompt_logprobs
                    yield echo
                output = seq.pending
                if not (output.text or output.token_ids or output.finish_reason is not None):
                    continue  # the prompt's scores came alone
                seq.pending = EngineOutput()
                yield output
                if output.finish_reason is not None:
                    return
        finally:
            # Normal end, cancel or a closed iterator: the loop drops the row at its next step.
            if not seq.finished:
                seq.cancelled = True
                self._wake.set()
            self._by_id.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        seq = self._by_id.get(request_id)
        if seq is not None and not seq.finished:
            seq.cancelled = True
            self._finish(seq, FinishReason.ABORT)
            self._wake.set()

    def _admit(self, request: GenerateRequest, request_id: str, prompt_ids: list[int]) -> _Sequence:
        if not prompt_ids:
            raise EngineError(ErrorCode.BAD_REQUEST, "the prompt is empty")
        resumed = list(request.resume_token_ids)
        if any(not 0 <= i < self._vocab_size for i in resumed):
            raise EngineError(ErrorCode.BAD_REQUEST, "resume_token_ids outside the vocabulary")
        request = fit_to_context(request, len(prompt_ids), self._context_length)
        total = len(prompt_ids) + len(resumed) + request.max_tokens
        if self._context_length and total > self._context_length:
            raise context_exceeded(len(prompt_ids), request.max_tokens, self._context_length, len(resumed))
        params = sampling.params_from(request)
        generator, _ = sampling.make_generator(request.seed)
        if not params.greedy:
            # A migrated request continues after the tokens it already streamed, and its seed's draws
            # after theirs: a seeded continuation is the one the lost worker would have sampled.
            sampling.skip_draws(generator, len(resumed))
        ignored = set() if request.ignore_eos else set(self._eos_ids)
        seq = _Sequence(
            request_id=request_id,
            prompt_ids=prompt_ids,
            prefill_ids=prompt_ids + resumed,
            limit=len(resumed) + request.max_tokens,
            params=params,
            generator=generator,
            counts=sampling.TokenCounts(self._vocab_size, prompt_ids) if params.penalized else None,
            text=TextStream(self._decode, prompt_ids, request.stop, resumed, request.resume_text_chars),
            stop_ids=frozenset(ignored | set(request.stop_token_ids)),
            prompt_top=request.prompt_logprobs if request.echo and not resumed else None,
        )
        seq.output_ids.extend(resumed)
        if seq.counts is not None:
            for token_id in resumed:
                seq.counts.add(token_id)
        seq.pending.prompt_tokens = len(prompt_ids)
        if request.max_tokens == 0 and seq.prompt_top is None:
            # Nothing to generate or score (echo only, or a resumed request already complete).
            self._finish(seq, FinishReason.LENGTH)
        self._by_id[request_id] = seq
        return seq

    async def _prompt_ids(self, request: GenerateRequest) -> list[int]:
        ids = given_token_ids(request, self._vocab_size)
        return ids if ids is not None else await encode_off_loop(request, self._encode)

    def _encode(self, request: GenerateRequest) -> list[int]:
        if request.messages is not None:
            messages = [{"role": m.role, "content": m.content} for m in request.messages]
            try:
                ids = self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            except Exception as exc:  # a template that rejects these messages (roles, order)
                message = f"the model's chat template rejected the messages: {exc}"
                raise EngineError(ErrorCode.BAD_REQUEST, message) from None
            if not isinstance(ids, list):  # newer transformers return a BatchEncoding
                ids = ids["input_ids"]
            return [int(i) for i in ids]
        return list(self._tokenizer(request.prompt or "", add_special_tokens=True)["input_ids"])

    def _prompt_text(self, prompt_ids: list[int]) -> str:
        return self._tokenizer.decode(prompt_ids, skip_special_tokens=False)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def _finish(self, seq: _Sequence, reason: FinishReason) -> None:
        if seq.finished:
            return
        seq.finished = True
        if reason is not FinishReason.ABORT:
            # Release what was held back: an incomplete character, or text that might have begun a stop string.
            seq.pending.text += seq.text.finish()
        seq.pending.finish_reason = reason
        seq.pending.prompt_tokens = len(seq.prompt_ids)
        seq.pending.completion_tokens = len(seq.output_ids)
        seq.ready.set()

    # ------------------------------------------------------------------ the engine loop

    async def _engine_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._drop_done()
            if not self._running and not self._waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            room = max(self.config.capacity - len(self._running), 0)
            joining = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
            scoring = [s for s in joining if s.prompt_top is not None]
            generating = [s for s in joining if s.limit > len(s.output_ids)]  # not max_tokens 0
            running = list(self._running)
            try:
                tokens, failures = await loop.run_in_executor(self._executor, self._step, scoring, generating, running)
            except Exception as exc:  # outside any one group's work: nothing in the batch can be trusted
                log.exception("engine step failed")
                for seq in joining + running:
                    self._fail(seq, str(exc))
                self._running, self._batches = [], []
                continue
            for seqs, reason in failures:  # those requests only; the next step drops their rows
                for seq in seqs:
                    self._fail(seq, reason)
            self._running.extend(generating)
            for seq in scoring:
                seq.ready.set()  # the echo and the prompt's logprobs go out first
            for seq in joining:
                if seq not in generating:
                    self._finish(seq, FinishReason.LENGTH)
            for token in tokens:
                self._deliver(token)
            # Let consumers and the socket loop run between steps.
            await asyncio.sleep(0)

    def _fail(self, seq: _Sequence, reason: str) -> None:
        seq.finished = True
        seq.error = f"engine failure: {reason}"
        seq.ready.set()

    def _drop_done(self) -> None:
        """Removes finished and cancelled requests from the batch (and cancelled ones from the queue)."""
        if any(s.cancelled for s in self._waiting):
            self._waiting = deque(s for s in self._waiting if not s.cancelled)
        if not any(s.finished or s.cancelled for s in self._running):
            return
        for batch in self._batches:
            rows = [i for i, s in enumerate(self._rows(batch)) if not (s.finished or s.cancelled)]
            if len(rows) < batch.rows and rows:
                batch.keep(rows)
        self._running = [s for s in self._running if not (s.finished or s.cancelled)]
        self._batches = [b for b in self._batches if any(s.batch is b for s in self._running)]

    def _rows(self, batch: BatchState) -> list[_Sequence]:
        """A batch's sequences in row order (rows follow the order sequences joined)."""
        return [s for s in self._running if s.batch is batch]

    # ------------------------------------------------------------------ the step (on the engine thread)

    def _step(
        self, scoring: list[_Sequence], joining: list[_Sequence], running: list[_Sequence]
    ) -> tuple[list[_Token], list[_Failure]]:
        """One decode step of every batch, then the scoring and prefill of newcomers.

        A failure (out of memory for a long prompt's prefill, say) fails the requests of the piece of work
        it struck: a batch's rows, one scored prompt, or one prefill group. The others go on.
        """
        tokens: list[_Token] = []
        failures: list[_Failure] = []
        with torch.inference_mode():
            for batch in list(self._batches):
                rows = [s for s in running if s.batch is batch]
                if rows:
                    try:
                        tokens.extend(self._decode_step(batch, rows))
                    except Exception as exc:
                        log.exception("decode step failed for %d request(s)", len(rows))
                        self._batches.remove(batch)  # its cache may have advanced for some rows only
                        failures.append((rows, str(exc)))
            for seq in scoring:
                try:
                    seq.prompt_logprobs = self._score_prompt(seq.prompt_ids, seq.prompt_top or 0)
                except Exception as exc:
                    log.exception("scoring a prompt failed")
                    failures.append(([seq], str(exc)))
            scored_badly = {id(seq) for seqs, _ in failures for seq in seqs}
            for group in self._prefill_groups([seq for seq in joining if id(seq) not in scored_badly]):
                try:
                    tokens.extend(self._prefill(group))
                except Exception as exc:
                    log.exception("prefill failed for %d request(s)", len(group))
                    failures.append((group, str(exc)))
        return tokens, failures

    def _score_prompt(self, ids: list[int], top: int) -> list[TokenLogprob]:
        """Each prompt token's logprob given the tokens before it (the first has none).

        A forward of its own, in chunks of SCORE_CHUNK positions over its own cache, so that the
        full-vocabulary logits held at once stay bounded whatever the prompt's length.
        """
        entries = [TokenLogprob(ids[0], self._token_text(ids[0]), None, raw=self._token_raw(ids[0]))]
        cache = None
        for start in range(0, len(ids) - 1, SCORE_CHUNK):
            targets = ids[start + 1 : start + 1 + SCORE_CHUNK]
            chunk = torch.tensor([ids[start : start + len(targets)]], dtype=torch.long, device=self._device)
            out = self._model(input_ids=chunk, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logprobs = torch.log_softmax(out.logits[0].float(), dim=-1).cpu()  # row i predicts targets[i]
            chosen = logprobs[torch.arange(len(targets)), torch.tensor(targets)].tolist()
            alternatives: list[list[tuple[int, float]]] = [[] for _ in targets]
            if top:
                values, best = torch.topk(logprobs, top, dim=-1)
                pairs = zip(best.tolist(), values.tolist(), strict=True)
                alternatives = [list(zip(row_ids, row_values, strict=True)) for row_ids, row_values in pairs]
            for token_id, logprob, best_of_row in zip(targets, chosen, alternatives, strict=True):
                top_entries = sampling.top_entries(best_of_row, self._token_text, self._token_raw)
                text, raw = self._token_text(token_id), self._token_raw(token_id)
                entries.append(TokenLogprob(token_id, text, logprob, top_entries, raw))
        return entries

    def _prefill_groups(self, joining: list[_Sequence]) -> list[list[_Sequence]]:
        """Consecutive runs of joining requests to prefill together (rows keep the join order).

        --deterministic prefills each alone; otherwise a group's padded size stays within
        MAX_PREFILL_TOKENS, which bounds the attention scores a CPU forward materialises.
        """
        if self.config.deterministic:
            return [[seq] for seq in joining]
        groups: list[list[_Sequence]] = []
        longest = 0
        for seq in joining:
            length = len(seq.prefill_ids)
            if groups and max(longest, length) * (len(groups[-1]) + 1) <= MAX_PREFILL_TOKENS:
                groups[-1].append(seq)
                longest = max(longest, length)
            else:
                groups.append([seq])
                longest = length
        return groups

    def _prefill(self, group: list[_Sequence]) -> list[_Token]:
        ids, mask, positions = prefill_inputs([seq.prefill_ids for seq in group], self._device)
        out = self._model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1]
        # Picked before the group joins a batch: if a pick fails, the running batch is untouched.
        picked = [self._pick(seq, logits[row]) for row, seq in enumerate(group)]
        state = BatchState.from_prefill(out.past_key_values, mask)
        if self.config.deterministic or not self._batches:
            self._batches.append(state)
        else:
            self._batches[0].merge(state)
            state = self._batches[0]
        for seq in group:
            seq.batch = state
        return picked

    def _decode_step(self, batch: BatchState, rows: list[_Sequence]) -> list[_Token]:
        input_ids = torch.tensor([[s.output_ids[-1]] for s in rows], dtype=torch.long, device=self._device)
        mask, positions = batch.step_inputs()
        out = self._model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=batch.cache,
            use_cache=True,
        )
        batch.advance(mask)
        logits = out.logits[:, -1].float().cpu()
        return [self._pick(seq, logits[i]) for i, seq in enumerate(rows)]

    def _pick(self, seq: _Sequence, logits: torch.Tensor) -> _Token:
        logits = logits.float().cpu()
        token_id = sampling.sample(logits, seq.params, seq.generator, seq.counts)
        # Recorded here, on the thread, because the next step's input is this token.
        seq.output_ids.append(token_id)
        if seq.counts is not None:
            seq.counts.add(token_id)
        logprob = None
        if seq.params.logprobs is not None:
            chosen, alternatives = sampling.token_logprobs(logits, token_id, seq.params.logprobs)
            top = sampling.top_entries(alternatives, self._token_text, self._token_raw)
            logprob = TokenLogprob(token_id, self._token_text(token_id), chosen, top, self._token_raw(token_id))
        return _Token(seq, token_id, logprob)

    def _token_text(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id], skip_special_tokens=False)

    def _token_raw(self, token_id: int) -> bytes | None:
        return raw_of(self._token_bytes, token_id)

    # ------------------------------------------------------------------ delivery (on the event loop)

    def _deliver(self, token: _Token) -> None:
        seq = token.seq
        if seq.finished or seq.cancelled:
            return
        pending = seq.pending
        if token.token_id in seq.stop_ids:
            self._finish(seq, FinishReason.STOP)
            return
        result = seq.text.add(token.token_id)
        pending.text += result.text
        pending.token_ids.append(token.token_id)
        if token.logprob is not None:
            pending.logprobs = (pending.logprobs or []) + [token.logprob]
        if result.stopped:
            self._finish(seq, FinishReason.STOP)
        elif len(seq.output_ids) >= seq.limit:
            self._finish(seq, FinishReason.LENGTH)
        else:
            seq.ready.set()
