"""The vLLM backend: a worker's engine is vLLM's AsyncLLM, streaming DELTA outputs.

vLLM is imported inside start(), so this module (and `mesh worker --help`)
loads without it. The engine core runs in a child process that vLLM starts
(with the `spawn` method on CPU); stop() shuts it down (SIGTERM and SIGINT
lead there), and a small reaper process ends the engine processes of a worker
killed outright (kill -9), so none outlives the worker.

Prompts are tokenized here, with the model's own tokenizer and chat template,
so that a prompt plus max_tokens over the context is refused with the numbers
before vLLM sees it, and so that usage counts the exact prompt tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from mesh.engines.base import (
    Engine,
    EngineConfig,
    EngineError,
    EngineOutput,
    EngineStats,
    context_exceeded,
    encode_off_loop,
    fit_to_context,
    given_token_ids,
)
from mesh.engines.sampling import validate
from mesh.engines.stop import TextStream
from mesh.engines.vocabulary import raw_of, token_bytes_table
from mesh.protocol import ErrorCode, FinishReason, GenerateRequest, TokenLogprob, TopLogprob

log = logging.getLogger("mesh.engines.vllm")

#: KV cache reserved on CPU unless the user sets one (--engine-arg kv_cache_memory_bytes=... or
#: VLLM_CPU_KVCACHE_SPACE in GiB). vLLM's CPU default reserves a share of all RAM, which fails on a
#: shared machine; 1 GiB holds about 45k tokens of SmolLM2-135M, five full 8k contexts.
CPU_KV_CACHE_BYTES = 1 << 30
#: The watchdog that ends vLLM's engine processes if the worker dies without stop() (kill -9, OOM killer).
#: It records the worker's descendants every second; when its stdin reaches EOF (the worker is gone)
#: without the word "done", it SIGKILLs them (psutil checks each pid's start time, so a reused pid is
#: never hit). multiprocessing's resource tracker is spared: it frees vLLM's shared memory by itself.
_REAPER = """
import os, signal, sys, threading, psutil
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
worker, known, said, heard = psutil.Process(int(sys.argv[1])), {}, [], threading.Event()
def listen():
    said.append(sys.stdin.buffer.read())
    heard.set()
threading.Thread(target=listen, daemon=True).start()
while not heard.is_set():
    try:
        for p in worker.children(recursive=True):
            if p.pid != os.getpid() and "resource_tracker" not in " ".join(p.cmdline()):
                known.setdefault(p.pid, p)
    except psutil.Error:
        pass
    heard.wait(1.0)
if said[0] != b"done":
    for p in known.values():
        try:
            p.kill()
        except psutil.Error:
            pass
"""
_FINISH_REASONS = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "abort": FinishReason.ABORT}


# ---------------------------------------------------------------------- pure decisions


def resolve_dtype(requested: str, device: str, cpu_has_bf16: bool) -> str:
    """`--dtype auto` on CPU: bfloat16 where the CPU computes it natively, else float32
    (vLLM's CPU kernels are fastest in bf16 with AVX512-BF16/AMX; emulated bf16 is slow)."""
    if requested != "auto" or not device.startswith("cpu"):
        return requested
    return "bfloat16" if cpu_has_bf16 else "float32"


def cpu_has_native_bf16(cpuinfo: str) -> bool:
    """Whether /proc/cpuinfo flags show bfloat16 arithmetic (x86 AVX512-BF16 or AMX, Arm BF16)."""
    flags = set(cpuinfo.split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def engine_arguments(
    config: EngineConfig, model_path: str, names: Sequence[str], dtype: str, env: Mapping[str, str]
) -> dict[str, Any]:
    """The AsyncEngineArgs keywords for this worker; --engine-arg entries override the rest."""
    args: dict[str, Any] = {
        "model": model_path,
        "served_model_name": list(names),
        "tensor_parallel_size": config.tensor_parallel_size,
        "gpu_memory_utilization": config.gpu_memory_utilization,
        "max_model_len": config.max_model_len,
        "dtype": dtype,
        "quantization": config.quantization,
        "enforce_eager": config.enforce_eager,
        # The worker's capacity bounds what the broker sends; let vLLM batch all of it.
        "max_num_seqs": config.capacity,
        # The worker reports load itself; vLLM's periodic stats lines would only add noise.
        "disable_log_stats": True,
    }
    if config.device.startswith("cpu"):
        if not env.get("VLLM_CPU_KVCACHE_SPACE"):
            args["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
        # torch.compile on a small CPU takes minutes at start; eager runs the same kernels.
        args["enforce_eager"] = True
    args.update(config.engine_args)
    return {key: value for key, value in args.items() if value is not None}


def sampling_arguments(request: GenerateRequest, seed: int | None) -> dict[str, Any]:
    """The SamplingParams keywords for one request (vLLM reads temperature 0 as greedy, top_k 0 as off)."""
    return {
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "top_k": request.top_k,
        "repetition_penalty": request.repetition_penalty,
        "presence_penalty": request.presence_penalty,
        "frequency_penalty": request.frequency_penalty,
        "stop": list(request.stop) or None,
        "stop_token_ids": list(request.stop_token_ids) or None,
        "ignore_eos": request.ignore_eos,
        # vLLM reads seed -1 as "no seed"; a negative seed is given as the number torch's manual_seed
        # maps it to itself, so every seed keeps its own fixed generator.
        "seed": seed if seed is None or seed >= 0 else seed + 2**64 - 1,
        "logprobs": request.logprobs,
    }


def _through(text_stream: TextStream, token_ids: list[int]) -> tuple[list[int], str, bool]:
    """New tokens through a TextStream: those up to a stop string, their text, and whether one ended it."""
    text = ""
    for count, token_id in enumerate(token_ids, 1):
        result = text_stream.add(token_id)
        text += result.text
        if result.stopped:
            return token_ids[:count], text, True
    return token_ids, text, False


def check_context(prompt_tokens: int, max_tokens: int, context_length: int, resumed: int = 0) -> None:
    """Refuses what vLLM would truncate or reject later, naming the numbers."""
    if prompt_tokens == 0:
        raise EngineError(ErrorCode.BAD_REQUEST, "the prompt is empty")
    if prompt_tokens + resumed + max_tokens > context_length:
        raise context_exceeded(prompt_tokens, max_tokens, context_length, resumed)


def finish_reason(reason: str | None) -> FinishReason:
    return _FINISH_REASONS.get(reason or "", FinishReason.STOP)


def token_logprobs(
    token_ids: Sequence[int], positions: Sequence[Mapping[int, Any]], top: int, token_bytes: list[bytes | None]
) -> list[TokenLogprob]:
    """vLLM's per-position {token id: Logprob} maps -> the chosen token and its `top` best alternatives
    (`token_bytes`: a vocabulary.token_bytes_table(), for their bytes)."""
    result = []
    for token_id, entries in zip(token_ids, positions, strict=False):
        chosen = entries.get(token_id)
        best = sorted(
            ((tid, lp) for tid, lp in entries.items() if lp.rank is not None and lp.rank <= top),
            key=lambda item: item[1].rank,
        )
        result.append(
            TokenLogprob(
                token_id,
                (chosen.decoded_token or "") if chosen is not None else "",
                chosen.logprob if chosen is not None else float("-inf"),
                [TopLogprob(tid, lp.decoded_token or "", lp.logprob, raw_of(token_bytes, tid)) for tid, lp in best],
                raw_of(token_bytes, token_id),
            )
        )
    return result


# ---------------------------------------------------------------------- the engine


class VllmEngine(Engine):
    backend = "vllm"
    #: A migrated request's resume_token_ids extend the prompt; generation carries on after them.
    supports_resume = True

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self._llm: Any = None
        self._reaper: subprocess.Popen[bytes] | None = None
        self._tokenizer: Any = None
        self._token_bytes: list[bytes | None] = []
        self._sampling_params: Any = None
        self._delta: Any = None
        #: What vLLM raises for a request it refuses (its validation errors): bad_request, not internal.
        self._refusals: tuple[type[BaseException], ...] = (ValueError,)
        self._names: list[str] = []
        self._context_length = 0
        self._vocab_size = 0
        #: request id -> whether it has produced output yet (no: it is still waiting).
        self._requests: dict[str, bool] = {}

    @property
    def model_names(self) -> list[str]:
        return self._names

    @property
    def context_length(self) -> int:
        return self._context_length

    def stats(self) -> EngineStats:
        waiting = sum(1 for started in self._requests.values() if not started)
        return EngineStats(running=len(self._requests) - waiting, waiting=waiting)

    async def start(self) -> None:
        from vllm import AsyncEngineArgs, SamplingParams
        from vllm.exceptions import VLLMClientError
        from vllm.platforms import current_platform
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.async_llm import AsyncLLM

        from mesh.models import resolve_model

        platform = current_platform.device_type
        if not self.config.device.startswith(platform):
            raise ValueError(f"--device {self.config.device}: the installed vLLM runs on {platform!r} only")
        resolved = await asyncio.to_thread(resolve_model, self.config.model_path, self.config.cache_dir)
        self._names = list(self.config.model_names or resolved.default_names)
        dtype = resolve_dtype(self.config.dtype, self.config.device, _cpu_has_bf16())
        kwargs = engine_arguments(self.config, str(resolved.path), self._names, dtype, os.environ)
        log.info("starting vLLM on %s (%s, dtype %s)", resolved.path, platform, dtype)
        try:
            engine_args = AsyncEngineArgs(**kwargs)
        except TypeError as exc:  # an --engine-arg vLLM does not know
            raise ValueError(f"vLLM engine arguments: {exc}") from None
        self._reaper = start_reaper(os.getpid())
        self._llm = AsyncLLM.from_engine_args(engine_args)
        self._tokenizer = self._llm.get_tokenizer()
        self._token_bytes = token_bytes_table(self._tokenizer)
        self._context_length = self._llm.model_config.max_model_len
        self._vocab_size = self._llm.model_config.get_vocab_size()
        self._sampling_params, self._delta = SamplingParams, RequestOutputKind.DELTA
        self._refusals = (ValueError, VLLMClientError)
        await self._warm_up()
        log.info("vLLM ready: %s, context %d tokens", ", ".join(self._names), self._context_length)

    async def _warm_up(self) -> None:
        """One short request, so that the first user does not pay for kernel set-up."""
        params = self._sampling_params(max_tokens=2, output_kind=self._delta, temperature=0)
        async for _ in self._llm.generate(self._engine_input(self._tokenizer.encode("Hello")), params, "warm-up"):
            pass

    async def stop(self) -> None:
        if self._llm is not None:
            llm, self._llm = self._llm, None
            # Blocks until the engine core process has exited (vLLM kills it after a timeout).
            llm.shutdown()
        if self._reaper is not None:
            reaper, self._reaper = self._reaper, None
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                reaper.communicate(b"done", timeout=5)
            if reaper.poll() is None:
                reaper.kill()
                reaper.wait()

    async def abort(self, request_id: str) -> None:
        if self._llm is not None and request_id in self._requests:
            await self._llm.abort(request_id)

    async def generate(self, request: GenerateRequest, request_id: str) -> AsyncIterator[EngineOutput]:
        if self._llm is None:
            raise EngineError(ErrorCode.INTERNAL, "the vLLM engine is not running")
        problem = validate(request)  # the same checks and messages as the transformers backend
        if problem:
            raise EngineError(ErrorCode.BAD_REQUEST, problem)
        prompt_ids, prompt_text = await self._tokenize(request)
        # A migrated request continues after the tokens another worker produced: they extend the prompt.
        # vLLM offers no way to move a seeded request's generator past their draws, so a sampled
        # continuation starts its draws afresh (the transformers backend skips them), and it counts
        # them as prompt, not output, for presence and frequency penalties.
        resumed = list(request.resume_token_ids)
        request = fit_to_context(request, len(prompt_ids), self._context_length)
        check_context(len(prompt_ids), request.max_tokens, self._context_length, len(resumed))
        seed = request.seed if request.seed is not None else self.config.seed
        prompt_top = request.prompt_logprobs if request.echo and not resumed else None
        arguments = sampling_arguments(request, seed)
        # vLLM's text starts after the prompt, and the resumed tokens are prompt to it: their text the
        # lost worker held back, and a stop string that spans the handover, are handled here instead.
        text_stream = (
            TextStream(self._decode, prompt_ids, request.stop, resumed, request.resume_text_chars) if resumed else None
        )
        if text_stream is not None:
            arguments["stop"] = None
        if prompt_top is not None:
            arguments.update(prompt_logprobs=prompt_top, max_tokens=max(request.max_tokens, 1))
        try:
            params = self._sampling_params(output_kind=self._delta, **arguments)
        except self._refusals as exc:  # vLLM's own range checks
            raise EngineError(ErrorCode.BAD_REQUEST, str(exc)) from None
        self._requests[request_id] = False
        produced = len(resumed)
        done = EngineOutput(
            finish_reason=FinishReason.LENGTH, prompt_tokens=len(prompt_ids), completion_tokens=produced
        )
        try:
            if request.echo and not resumed and prompt_top is None:
                yield EngineOutput(text=prompt_text)
            if request.max_tokens == 0 and prompt_top is None:  # vLLM refuses 0; nothing to generate or score
                yield done
                return
            stream = self._llm.generate(self._engine_input(prompt_ids + resumed), params, request_id)
            # aclosing: when our consumer stops early, vLLM's generator is closed and aborts the request.
            async with contextlib.aclosing(stream):
                async for output in stream:
                    self._requests[request_id] = True
                    if prompt_top is not None and output.prompt_logprobs:  # all of them, in the first output
                        entries = self._prompt_entries(prompt_ids, output, prompt_top)
                        yield EngineOutput(text=prompt_text, logprobs=entries)
                        prompt_top = None
                        if request.max_tokens == 0:  # scored only: the token drawn for max_tokens 1 is dropped
                            yield done
                            return
                    completion = output.outputs[0]
                    token_ids = list(completion.token_ids)
                    text = completion.text
                    finish = finish_reason(completion.finish_reason) if output.finished else None
                    if text_stream is not None:
                        # Stop strings are applied here, so vLLM's "stop" is a stop token (EOS or a stop
                        # token id): counted, but, as vLLM and the transformers backend do, without text.
                        by_token = finish is FinishReason.STOP and bool(token_ids)
                        kept, text, stopped = _through(text_stream, token_ids[:-1] if by_token else token_ids)
                        if stopped:
                            token_ids, finish = kept, FinishReason.STOP  # returning below aborts it in vLLM
                        elif finish is not None:
                            text += text_stream.finish()
                    produced += len(token_ids)
                    delta = EngineOutput(text=text, token_ids=token_ids)
                    if request.logprobs is not None and completion.logprobs:
                        delta.logprobs = token_logprobs(
                            token_ids, completion.logprobs, request.logprobs, self._token_bytes
                        )
                    if finish is not None:
                        delta.finish_reason = finish
                        delta.prompt_tokens, delta.completion_tokens = len(prompt_ids), produced
                    yield delta
                    if finish is not None:
                        return
        except self._refusals as exc:  # vLLM's request validation
            raise EngineError(ErrorCode.BAD_REQUEST, str(exc)) from None
        finally:
            self._requests.pop(request_id, None)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def _prompt_entries(self, prompt_ids: list[int], output: Any, top: int) -> list[TokenLogprob]:
        """vLLM's prompt logprobs (None for the first position, which nothing predicts) as wire entries."""
        first_id = prompt_ids[0]
        first_raw = raw_of(self._token_bytes, first_id)
        first = TokenLogprob(first_id, self._tokenizer.decode([first_id]), None, raw=first_raw)
        return [first, *token_logprobs(prompt_ids[1:], output.prompt_logprobs[1:], top, self._token_bytes)]

    def _engine_input(self, token_ids: list[int]) -> Any:
        """Token ids as vLLM takes them: rendered by its renderer where it has one (vLLM >= 0.3x
        deprecates raw prompts), else the plain token prompt."""
        prompt = {"prompt_token_ids": token_ids}
        render = getattr(getattr(self._llm, "renderer", None), "render_cmpl", None)
        if render is None:
            return prompt
        (engine_input,) = render([prompt])
        return engine_input

    async def _tokenize(self, request: GenerateRequest) -> tuple[list[int], str]:
        """The prompt as token ids, and as text (what echo returns)."""
        ids = given_token_ids(request, self._vocab_size)
        if ids is not None:
            return ids, self._tokenizer.decode(ids) if request.echo else ""
        return await encode_off_loop(request, self._encode)

    def _encode(self, request: GenerateRequest) -> tuple[list[int], str]:
        if request.messages is None:
            text = request.prompt or ""
            return list(self._tokenizer.encode(text)), text
        messages = [
            {"role": m.role, "content": m.content, **({"name": m.name} if m.name else {})} for m in request.messages
        ]
        try:
            text = self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # no chat template, or messages it refuses (roles, order)
            message = f"the model's chat template rejected the messages: {exc}"
            raise EngineError(ErrorCode.BAD_REQUEST, message) from None
        # The template writes its own special tokens.
        return list(self._tokenizer.encode(text, add_special_tokens=False)), text


def start_reaper(pid: int) -> subprocess.Popen[bytes]:
    """The watchdog (_REAPER) over `pid`'s descendants; write b"done" to its stdin on a clean stop."""
    return subprocess.Popen([sys.executable, "-I", "-c", _REAPER, str(pid)], stdin=subprocess.PIPE, close_fds=True)


def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return cpu_has_native_bf16(cpuinfo.read())
    except OSError:
        return False
