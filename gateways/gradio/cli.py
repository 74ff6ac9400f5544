"""`mesh gateway gradio`: the chat UI in its own process (a thin layer over gateways.gradio.app)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from mesh.cli_options import add_mesh_options, port_number, security_from_args
from mesh.endpoints import is_loopback_host

log = logging.getLogger("gateways.gradio")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "gradio",
        help="run the Gradio chat UI",
        description="A chat page over the mesh: model list from the discovery bus, streaming replies, "
        "votes and flags logged as JSON lines, and a live view of the mesh.",
    )
    add_mesh_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1)")
    p.add_argument("--port", type=port_number, default=7860, help="HTTP port (default: 7860)")
    p.add_argument(
        "--model-list-mode",
        choices=["once", "reload"],
        default="once",
        help="once: the model list is read at the first page load that finds a model and kept; "
        "reload: read again on every page load (default: once)",
    )
    p.add_argument("--concurrency-count", type=int, default=10, metavar="N", help="chats served at once (default: 10)")
    p.add_argument(
        "--gradio-auth-path",
        type=Path,
        metavar="FILE",
        help="require a login: a file of user:password lines (blank lines and # comments ignored)",
    )
    p.add_argument("--gradio-root-path", default="", metavar="PATH", help="URL prefix when behind a proxy, e.g. /chat")
    p.add_argument(
        "--share", action="store_true", help="also publish a public *.gradio.live link (needs internet access)"
    )
    p.add_argument(
        "--log-dir",
        type=Path,
        metavar="DIR",
        help="where votes and flags go, as JSON lines, one file a day (default: ~/.local/state/llm-mesh/gradio)",
    )
    p.add_argument(
        "--request-timeout", type=float, default=300.0, metavar="S", help="longest wait for a token (default: 300)"
    )
    p.set_defaults(run=_run)


def read_auth_file(path: Path) -> tuple[tuple[str, str], ...]:
    """user:password lines; raises ValueError naming the bad line.

    The password is everything after the first colon up to the line ending, spaces included: stripping
    them would lock out a user whose password ends in one. Blank lines and # comments are skipped."""
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):  # drops the line endings
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user.strip() or not password.strip():
            raise ValueError(f"{path}:{number}: expected user:password")
        pairs.append((user.strip(), password))
    if not pairs:
        raise ValueError(f"{path}: no user:password lines")
    return tuple(pairs)


def _run(args: argparse.Namespace) -> int:
    if args.concurrency_count < 1:
        raise ValueError("--concurrency-count must be at least 1")
    # Nothing may phone home from the UI process.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from gateways.gradio.app import DEFAULT_LOG_DIR, GradioConfig, serve

    config = GradioConfig(
        broker_url=args.broker,
        host=args.host,
        port=args.port,
        model_list_mode=args.model_list_mode,
        concurrency_count=args.concurrency_count,
        auth=read_auth_file(args.gradio_auth_path) if args.gradio_auth_path else (),
        root_path=args.gradio_root_path.rstrip("/"),
        share=args.share,
        log_dir=args.log_dir or DEFAULT_LOG_DIR,
        request_timeout=args.request_timeout,
        security=security_from_args(args),
    )
    warn_when_open(config.host, config.share, config.auth)
    serve(config)
    return 0


def warn_when_open(host: str, share: bool, auth: tuple[tuple[str, str], ...]) -> bool:
    """Logs a warning (and says so) when others can reach the UI with no login, as the OpenAI gateway
    does without --api-keys: the mesh's CURVE keys guard only its own sockets, not this page."""
    if auth or (is_loopback_host(host) and not share):
        return False
    where = "a public *.gradio.live link" if share else host
    log.warning("serving on %s with no --gradio-auth-path: anyone who reaches it can use the models", where)
    return True
