"""The gateway's one config object, built by `mesh gateway openai` (or by a program embedding it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from mesh.endpoints import DEFAULT_BROKER_URL
from mesh.security import SecurityConfig

DEFAULT_MAX_BODY_SIZE = 8 * 1024 * 1024
#: Chat requests that set no max_tokens get this many at most (and at most what the prompt leaves of the context).
DEFAULT_CHAT_MAX_TOKENS = 1024
#: CORS, once --allowed-origins turns it on. Any request header by default: the OpenAI SDKs send their
#: own (openai-node: X-Stainless-*), and a preflight that refuses one blocks the call in the browser.
DEFAULT_ALLOWED_METHODS = ("GET", "POST", "OPTIONS")
DEFAULT_ALLOWED_HEADERS = ("*",)


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    broker_url: str = DEFAULT_BROKER_URL
    host: str = "127.0.0.1"
    port: int = 8000
    #: Bearer keys accepted on every route but /health; empty: no authentication.
    api_keys: tuple[str, ...] = ()
    #: CORS: origins allowed to call from a browser ("*" for any); empty: no CORS headers at all.
    allowed_origins: tuple[str, ...] = ()
    allowed_methods: tuple[str, ...] = DEFAULT_ALLOWED_METHODS
    allowed_headers: tuple[str, ...] = DEFAULT_ALLOWED_HEADERS
    allow_credentials: bool = False
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None
    max_body_size: int = DEFAULT_MAX_BODY_SIZE
    #: Longest wait for any frame of a request (None: the mesh's liveness checks alone).
    timeout: float | None = None
    default_max_tokens: int = DEFAULT_CHAT_MAX_TOKENS
    security: SecurityConfig = field(default_factory=SecurityConfig)
