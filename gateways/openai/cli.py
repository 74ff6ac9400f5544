"""`mesh gateway openai`: the OpenAI-compatible HTTP API in front of the mesh."""

from __future__ import annotations

import argparse
import asyncio
import logging
import ssl

from gateways.openai.config import DEFAULT_ALLOWED_HEADERS, DEFAULT_ALLOWED_METHODS, GatewayConfig
from mesh.cli_options import add_mesh_options, comma_list, port_number, run_service, security_from_args
from mesh.endpoints import is_loopback_host
from mesh.heap import freeze_startup_objects

log = logging.getLogger("gateways.openai")


def _size(value: str) -> int:
    """Bytes, with an optional K/M/G suffix (powers of 1024)."""
    text = value.strip().upper().removesuffix("B")
    factor = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(text[-1:], 1)
    number = int(float(text[:-1] if factor > 1 else text) * factor)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return number


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "openai",
        help="serve the OpenAI API (chat completions, completions, models) over HTTP",
        description="An OpenAI-compatible HTTP server: point the openai SDK at http://HOST:PORT/v1.",
    )
    add_mesh_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=port_number, default=8000, help="port to listen on (default: 8000)")
    p.add_argument(
        "--api-keys",
        type=comma_list,
        default=(),
        metavar="K1,K2",
        help="accept only these Bearer keys on every route but /health (default: no keys needed)",
    )
    p.add_argument(
        "--allowed-origins",
        type=comma_list,
        default=(),
        metavar="O1,O2",
        help="CORS: origins browsers may call from, '*' for any (default: none, no CORS headers)",
    )
    p.add_argument(
        "--allowed-methods",
        type=comma_list,
        default=DEFAULT_ALLOWED_METHODS,
        metavar="M1,M2",
        help=f"CORS: allowed methods (default: {','.join(DEFAULT_ALLOWED_METHODS)})",
    )
    p.add_argument(
        "--allowed-headers",
        type=comma_list,
        default=DEFAULT_ALLOWED_HEADERS,
        metavar="H1,H2",
        help="CORS: allowed request headers, '*' for any (default: *, since the OpenAI SDKs send headers of their own)",
    )
    p.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials (cookies, auth)")
    p.add_argument("--ssl-keyfile", metavar="PATH", help="serve HTTPS with this private key (with --ssl-certfile)")
    p.add_argument("--ssl-certfile", metavar="PATH", help="serve HTTPS with this certificate chain")
    p.add_argument(
        "--max-body-size",
        type=_size,
        default="8M",
        metavar="SIZE",
        help="largest request body, e.g. 512K or 8M; larger gets 413 (default: 8M)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="S",
        help="longest wait for any token of a request before 504 (default: none; dead workers are "
        "detected by the mesh within seconds)",
    )
    p.add_argument(
        "--default-max-tokens",
        type=int,
        default=1024,
        metavar="N",
        help="max_tokens of a chat request that sets none, lowered to what its prompt leaves of the context "
        "(default: 1024)",
    )
    p.set_defaults(run=_run)


def _check_args(args: argparse.Namespace) -> None:
    if bool(args.ssl_keyfile) != bool(args.ssl_certfile):
        raise ValueError("--ssl-keyfile and --ssl-certfile go together")
    if args.default_max_tokens < 1:
        raise ValueError("--default-max-tokens must be at least 1")


def _run(args: argparse.Namespace) -> int:
    _check_args(args)
    config = GatewayConfig(
        broker_url=args.broker,
        host=args.host,
        port=args.port,
        api_keys=args.api_keys,
        allowed_origins=args.allowed_origins,
        allowed_methods=args.allowed_methods,
        allowed_headers=args.allowed_headers,
        allow_credentials=args.allow_credentials,
        ssl_keyfile=args.ssl_keyfile,
        ssl_certfile=args.ssl_certfile,
        max_body_size=args.max_body_size,
        timeout=args.timeout,
        default_max_tokens=args.default_max_tokens,
        security=security_from_args(args),
    )
    ssl_context = ssl_context_for(config)  # a bad key or cert fails here, before anything listens
    run_service(lambda: GatewayService(config, ssl_context))
    return 0


def ssl_context_for(config: GatewayConfig) -> ssl.SSLContext | None:
    if not config.ssl_certfile:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.ssl_certfile, config.ssl_keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(
            f"cannot load --ssl-certfile {config.ssl_certfile} with --ssl-keyfile {config.ssl_keyfile}: {exc}"
        ) from None
    return context


class _QuietBadHttp(logging.Filter):
    """aiohttp logs a request it cannot even parse (a NUL in a header, say) with a traceback; it has
    already answered 400, so one line is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import BadHttpMessage

        if record.exc_info and isinstance(record.exc_info[1], BadHttpMessage):
            record.msg, record.args = "unparsable HTTP request answered 400: %s", (record.exc_info[1].message,)
            record.exc_info, record.exc_text, record.levelno, record.levelname = None, None, logging.INFO, "INFO"
        return True


class GatewayService:
    """Serves the app until stop(); the runner's cleanup closes the MeshClient and open streams."""

    def __init__(self, config: GatewayConfig, ssl_context: ssl.SSLContext | None) -> None:
        self.config = config
        self.ssl_context = ssl_context
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        from aiohttp import web

        from gateways.openai.app import create_app

        config = self.config
        if not is_loopback_host(config.host) and not config.api_keys:
            log.warning("listening on %s with no --api-keys: anyone who reaches it can use the models", config.host)
        logging.getLogger("aiohttp.server").addFilter(_QuietBadHttp())
        runner = web.AppRunner(create_app(config), handler_cancellation=True, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, config.host, config.port, ssl_context=self.ssl_context)
            await site.start()
            freeze_startup_objects()
            scheme = "https" if self.ssl_context else "http"
            log.info("OpenAI API on %s://%s:%d/v1 (broker %s)", scheme, config.host, config.port, config.broker_url)
            await self._stopping.wait()
        finally:
            await runner.cleanup()

    def stop(self) -> None:
        self._stopping.set()
