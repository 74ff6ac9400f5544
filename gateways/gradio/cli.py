"""`mesh gateway gradio`: the chat UI in its own process (a thin layer over gateways.gradio.app)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from mesh.cli_options import add_mesh_options, security_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "gradio",
        help="run the Gradio chat UI",
        description="A chat page over the mesh: model list from the discovery bus, streaming replies, "
        "votes and flags logged as JSON lines, and a live view of the mesh.",
    )
    add_mesh_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="HTTP port (default: 7860)")
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
    p.add_argument("--log-dir", type=Path, metavar="DIR", help="where votes and flags go (JSON lines, one file a day)")
    p.add_argument(
        "--request-timeout", type=float, default=300.0, metavar="S", help="longest wait for a token (default: 300)"
    )
    p.set_defaults(run=_run)


def read_auth_file(path: Path) -> tuple[tuple[str, str], ...]:
    """user:password lines; raises ValueError naming the bad line."""
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user.strip() or not password:
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
    serve(config)
    return 0
