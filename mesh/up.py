"""`mesh up`: the whole mesh on this machine (broker, one worker, OpenAI gateway, Gradio UI) as child processes.

Each child runs in a process group of its own, so that stopping it also stops
whatever it started (vLLM's engine process, for one). MeshUp starts them all at
once, waits until each answers (the worker's model is on the bus, the API's
/health and the UI's page return 200), prints the URLs, and stops everything
on SIGINT/SIGTERM or as soon as one child dies.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from mesh.endpoints import DEFAULT_BROKER_URL, PORTS_PER_BROKER, Endpoints

LOOPBACK = "127.0.0.1"
LOG_TAIL_LINES = 30
_PR_SET_PDEATHSIG = 1


class UpError(Exception):
    """A part of the mesh failed to start or died; `detail` is the tail of its log."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class UpConfig:
    broker_url: str = DEFAULT_BROKER_URL
    api_port: int = 8000
    ui_port: int = 7860
    #: Passed through to `mesh worker` (None: the worker's own default).
    backend: str | None = None
    model_path: str | None = None
    model_names: tuple[str, ...] = ()
    #: Any other `mesh worker` options, as command-line words.
    worker_args: tuple[str, ...] = ()
    api: bool = True
    #: Any other `mesh gateway openai` options, as command-line words.
    api_args: tuple[str, ...] = ()
    ui: bool = True
    ui_args: tuple[str, ...] = ()
    log_dir: Path | None = None
    start_timeout: float = 600.0
    stop_timeout: float = 10.0
    python: str = sys.executable


@dataclass(frozen=True, slots=True)
class ChildSpec:
    name: str
    argv: tuple[str, ...]


@dataclass(slots=True)
class Child:
    spec: ChildSpec
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def exited(self) -> int | None:
        return self.popen.poll()

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def child_specs(config: UpConfig) -> list[ChildSpec]:
    """The commands to run, in start order (stopped in reverse)."""
    mesh = (config.python, "-m", "mesh.cli")
    broker = ("--broker", config.broker_url)
    worker = [*mesh, "worker", *broker, "--drain-timeout", str(max(config.stop_timeout - 2.0, 1.0))]
    if config.backend:
        worker += ["--backend", config.backend]
    if config.model_path:
        worker += ["--model-path", config.model_path]
    if config.model_names:
        worker += ["--model-names", ",".join(config.model_names)]
    worker += config.worker_args
    specs = [ChildSpec("broker", (*mesh, "broker", *broker)), ChildSpec("worker", tuple(worker))]
    if config.api:
        api = (*mesh, "gateway", "openai", *broker, "--host", LOOPBACK, "--port", str(config.api_port))
        specs.append(ChildSpec("openai", (*api, *config.api_args)))
    if config.ui:
        ui = (*mesh, "gateway", "gradio", *broker, "--host", LOOPBACK, "--port", str(config.ui_port))
        specs.append(ChildSpec("gradio", (*ui, "--model-list-mode", "reload", *config.ui_args)))
    return specs


def ports_needed(config: UpConfig) -> list[tuple[int, str]]:
    endpoints = Endpoints.from_url(config.broker_url)
    ports = [
        (endpoints.port + i, f"the broker ({config.broker_url} uses {PORTS_PER_BROKER} ports)")
        for i in range(PORTS_PER_BROKER)
    ]
    if config.api:
        ports.append((config.api_port, "the OpenAI API (--api-port)"))
    if config.ui:
        ports.append((config.ui_port, "the chat UI (--ui-port)"))
    return ports


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def check_ports(config: UpConfig) -> None:
    seen: dict[int, str] = {}
    for port, purpose in ports_needed(config):
        if port in seen:
            raise UpError(f"port {port} is wanted twice: by {seen[port]} and by {purpose}")
        seen[port] = purpose
        if port_in_use(LOOPBACK, port):
            raise UpError(f"port {port} is already in use; it is needed for {purpose}. Free it or pick another port.")


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when `mesh up` itself dies, even by SIGKILL (Linux only)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


@dataclass(slots=True)
class Ready:
    model_names: list[str] = field(default_factory=list)
    seconds: float = 0.0


class MeshUp:
    """Starts, watches and stops the children. run() returns the exit status."""

    def __init__(self, config: UpConfig) -> None:
        self.config = config
        self.children: list[Child] = []
        self.log_dir = config.log_dir or Path(tempfile.mkdtemp(prefix="mesh-up-"))
        self.exit_code = 0
        self._stop = asyncio.Event()
        self._stop_requests = 0

    # ------------------------------------------------------------------ lifecycle

    def stop(self) -> None:
        """Signal handler: the first call stops cleanly, a second one stops without waiting."""
        self._stop_requests += 1
        self._stop.set()

    async def run(self) -> None:
        try:
            check_ports(self.config)
            self.start_children()
            ready = await self.wait_ready()
            if ready is None:
                return  # stopped while starting
            print(self.banner(ready), flush=True)
            await self.watch()
        except UpError as exc:
            self.exit_code = 1
            self._report(exc)
        finally:
            await self.shutdown()

    def start_children(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach a model hub at run time
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
        for spec in child_specs(self.config):
            log_path = self.log_dir / f"{spec.name}.log"
            with log_path.open("wb") as log:
                popen = subprocess.Popen(
                    spec.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,  # its own process group: killpg reaches its children too
                    preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                )
            self.children.append(Child(spec, popen, log_path))

    def _check_children(self) -> None:
        for child in self.children:
            code = child.exited()
            if code is not None:
                raise UpError(f"the {child.spec.name} exited with code {code} (log: {child.log_path})", child.tail())

    def _child(self, name: str) -> Child | None:
        return next((c for c in self.children if c.spec.name == name), None)

    async def wait_ready(self) -> Ready | None:
        """Until every part answers; None when stopped first. Raises UpError on a death or the time limit."""
        import aiohttp

        from mesh.client import MeshClient

        start = time.monotonic()
        waiting = {c.spec.name for c in self.children}
        worker = self._child("worker")
        ready = Ready()
        timeout = aiohttp.ClientTimeout(total=2.0)
        async with MeshClient(self.config.broker_url) as client, aiohttp.ClientSession(timeout=timeout) as http:
            while waiting:
                if self._stop.is_set():
                    return None
                self._check_children()
                if time.monotonic() - start > self.config.start_timeout:
                    slow = ", ".join(sorted(waiting))
                    tail = "\n".join(f"--- {n}\n{c.tail(10)}" for n in sorted(waiting) if (c := self._child(n)))
                    raise UpError(f"not ready after {self.config.start_timeout:.0f} s: {slow}", tail)
                if "broker" in waiting and client.broker_alive:
                    waiting.discard("broker")
                if "worker" in waiting and worker is not None:
                    mine = [w for w in client.workers() if w.pid == worker.pid] or client.workers()
                    if mine:
                        ready.model_names = list(mine[0].models)
                        waiting.discard("worker")
                if "openai" in waiting and await _http_ok(http, f"{self.api_url}/health"):
                    waiting.discard("openai")
                if "gradio" in waiting and await _http_ok(http, self.ui_url):
                    waiting.discard("gradio")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 0.25)
        ready.seconds = time.monotonic() - start
        return ready

    async def watch(self) -> None:
        """Until a stop request (exit 0) or a child's death (UpError)."""
        while not self._stop.is_set():
            self._check_children()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 0.5)

    async def shutdown(self) -> None:
        """Gateways and worker together (the worker drains what is in flight), the broker last, so that
        the last tokens can still reach their clients; SIGKILL what lingers."""
        stages = [["gradio", "openai", "worker"], ["broker"]]
        for stage in stages:
            await asyncio.gather(*(self._stop_child(c) for c in self.children if c.spec.name in stage))

    async def _stop_child(self, child: Child) -> None:
        if child.exited() is None:
            _signal_group(child.pid, signal.SIGTERM)
            deadline = time.monotonic() + self.config.stop_timeout
            while child.exited() is None and time.monotonic() < deadline and self._stop_requests < 2:
                await asyncio.sleep(0.05)
        # The leader may be gone while something it started is not: sweep the whole group.
        _signal_group(child.pid, signal.SIGKILL)
        if child.exited() is None:
            await asyncio.to_thread(child.popen.wait)

    # ------------------------------------------------------------------ output

    @property
    def api_url(self) -> str:
        return f"http://{LOOPBACK}:{self.config.api_port}"

    @property
    def ui_url(self) -> str:
        return f"http://{LOOPBACK}:{self.config.ui_port}/"

    def banner(self, ready: Ready) -> str:
        model = ready.model_names[0] if ready.model_names else "?"
        lines = [f"llm-mesh is up in {ready.seconds:.1f} s, serving {', '.join(ready.model_names) or '?'}"]
        if self.config.api:
            lines.append(f"  OpenAI API  {self.api_url}/v1   (model {model!r}; try: curl {self.api_url}/v1/models)")
        if self.config.ui:
            lines.append(f"  Chat UI     {self.ui_url}")
        lines.append(f"  Broker      {self.config.broker_url}   (mesh status --broker {self.config.broker_url})")
        lines.append(f"  Logs        {self.log_dir}")
        lines.append("Press Ctrl-C to stop.")
        return "\n".join(lines)

    def _report(self, exc: UpError) -> None:
        print(f"mesh up: {exc.reason}", file=sys.stderr)
        if exc.detail:
            print(f"---- last lines of its log\n{exc.detail}\n----", file=sys.stderr)
        sys.stderr.flush()


async def _http_ok(http: object, url: str) -> bool:
    import aiohttp

    assert isinstance(http, aiohttp.ClientSession)
    try:
        async with http.get(url) as response:
            return response.status == 200
    except (aiohttp.ClientError, TimeoutError, OSError):
        return False


# ---------------------------------------------------------------------- CLI


def register(sub: argparse._SubParsersAction) -> None:
    from mesh.cli_options import add_cpu_latency_option, comma_list, port_number

    p = sub.add_parser(
        "up",
        help="run the whole mesh here: broker, worker, OpenAI API and chat UI",
        description="Starts a broker, one worker, the OpenAI gateway and the Gradio UI on loopback, prints "
        "their URLs once all answer, and stops them all on Ctrl-C.",
    )
    p.add_argument(
        "--broker",
        default=DEFAULT_BROKER_URL,
        metavar="URL",
        help=f"the broker's address; it uses this port and the three after it (default: {DEFAULT_BROKER_URL})",
    )
    p.add_argument("--api-port", type=port_number, default=8000, help="OpenAI API port (default: 8000)")
    p.add_argument("--ui-port", type=port_number, default=7860, help="chat UI port (default: 7860)")
    p.add_argument("--backend", help="worker backend: transformers (default), vllm, or synthetic (fake tokens, tests)")
    p.add_argument("--model-path", metavar="PATH", help="model folder or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--model-names", type=comma_list, default=(), metavar="A,B", help="names to serve the model under")
    p.add_argument(
        "--worker-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one more word for `mesh worker`, repeatable (e.g. --worker-arg=--capacity --worker-arg=4)",
    )
    p.add_argument("--no-api", action="store_true", help="do not start the OpenAI gateway")
    p.add_argument("--no-ui", action="store_true", help="do not start the chat UI")
    p.add_argument(
        "--api-keys",
        type=comma_list,
        default=(),
        metavar="K1,K2",
        help="passed to the OpenAI gateway: accept only these Bearer keys (default: no keys needed)",
    )
    p.add_argument("--gradio-auth-path", type=Path, metavar="FILE", help="passed to the UI: user:password lines")
    p.add_argument(
        "--log-dir",
        type=Path,
        metavar="DIR",
        help="where each child's log goes, and the UI's votes and flags, under DIR/gradio (default: logs in a new "
        "temp dir, votes and flags where `mesh gateway gradio` keeps them, ~/.local/state/llm-mesh/gradio)",
    )
    p.add_argument(
        "--start-timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="give up when not everything answers after S seconds (default: 600)",
    )
    add_cpu_latency_option(p)  # system-wide: held by `mesh up` itself, for all its children
    p.add_argument(
        "--log-level",
        default="WARNING",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log verbosity of `mesh up` itself (default: WARNING)",
    )
    p.set_defaults(run=_run)


def config_from_args(args: argparse.Namespace) -> UpConfig:
    ui_args: list[str] = []
    if args.gradio_auth_path:
        ui_args += ["--gradio-auth-path", str(args.gradio_auth_path)]
    if args.log_dir:
        # Votes and flags beside the logs: with --log-dir, everything this run writes is in one place.
        ui_args += ["--log-dir", str(args.log_dir / "gradio")]
    api_args = ["--api-keys", ",".join(args.api_keys)] if args.api_keys else []
    return UpConfig(
        broker_url=args.broker,
        api_port=args.api_port,
        ui_port=args.ui_port,
        backend=args.backend,
        model_path=args.model_path,
        model_names=args.model_names,
        worker_args=tuple(args.worker_arg),
        api=not args.no_api,
        api_args=tuple(api_args),
        ui=not args.no_ui,
        ui_args=tuple(ui_args),
        log_dir=args.log_dir,
        start_timeout=args.start_timeout,
    )


def _run(args: argparse.Namespace) -> int:
    from mesh.cli_options import run_service

    config = config_from_args(args)
    Endpoints.from_url(config.broker_url)  # a bad URL: one clear line from the CLI, before anything starts
    up = MeshUp(config)
    run_service(lambda: up)
    return up.exit_code
