"""The Gradio chat UI over the mesh: `build_app(config)` makes the Blocks, `serve(config)` runs them.

The UI talks to the mesh through one MeshClient (gateways.gradio.link), never
through the HTTP gateway. It runs in a process of its own.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import gradio as gr

from gateways.gradio import feedback
from gateways.gradio.conversation import (
    MAX_OUTPUT_TOKENS,
    Conversation,
    InputError,
    ReplyTiming,
    Sampling,
    Turn,
    check_message,
    check_sampling,
    error_text,
    render,
    reply_note,
    to_request,
)
from gateways.gradio.link import MeshLink
from mesh.errors import MeshError
from mesh.protocol import Announcement
from mesh.security import SecurityConfig

log = logging.getLogger("gateways.gradio")

ModelListMode = Literal["once", "reload"]
MESH_REFRESH_S = 2.0
MESH_COLUMNS = [
    "worker",
    "models",
    "backend",
    "in flight / capacity",
    "tokens/s",
    "tokens/s per request",
    "state",
    "host:pid",
]
DEFAULT_LOG_DIR = Path.home() / ".local" / "state" / "llm-mesh" / "gradio"


@dataclass(frozen=True, slots=True)
class GradioConfig:
    broker_url: str
    host: str = "127.0.0.1"
    port: int = 7860
    model_list_mode: ModelListMode = "once"
    concurrency_count: int = 10
    #: (user, password) pairs; empty: no login.
    auth: tuple[tuple[str, str], ...] = ()
    root_path: str = ""
    share: bool = False
    log_dir: Path = DEFAULT_LOG_DIR
    #: Longest wait for any frame of a reply.
    request_timeout: float = 300.0
    security: SecurityConfig = field(default_factory=SecurityConfig)


def mesh_rows(workers: list[Announcement]) -> list[list[str]]:
    """The live-mesh table, one row per worker."""
    rows = []
    for w in sorted(workers, key=lambda w: w.worker_id):
        rows.append(
            [
                w.worker_id,
                ", ".join(w.models),
                w.backend,
                f"{w.inflight}/{w.capacity}" + (f" (+{w.waiting} waiting)" if w.waiting else ""),
                f"{w.tokens_per_s:.1f}",
                f"{w.request_tokens_per_s:.1f}",
                "draining" if w.draining else "serving",
                f"{w.host}:{w.pid}",
            ]
        )
    return rows


class _Handlers:
    """The event handlers; one instance per UI process, holding the mesh link and the model-list cache."""

    def __init__(self, config: GradioConfig, link: MeshLink) -> None:
        self.config = config
        self.link = link
        self._frozen_models: list[str] = []  # --model-list-mode once: the first non-empty list, kept

    # ---------------------------------------------------------------- models and the mesh tab

    async def _live_models(self) -> list[str]:
        try:
            client = await self.link.client()
            await client.wait_for_broker()  # at once after the first snapshot; until then, every worker
        except MeshError as exc:
            log.warning("model list: %s", exc.message)
            return []
        return sorted(client.models())

    async def model_dropdown(self, current: str | None) -> gr.Dropdown:
        if self.config.model_list_mode == "once" and self._frozen_models:
            models = self._frozen_models
        else:
            models = await self._live_models()
            if self.config.model_list_mode == "once" and models:
                self._frozen_models = models
        value = current if current in models else (models[0] if models else None)
        return gr.Dropdown(choices=models, value=value)

    async def mesh_view(self) -> tuple[str, list[list[str]]]:
        try:
            client = await self.link.client()
        except MeshError as exc:
            return f"⚠️ {exc.message}", []
        info = client.broker_info
        if info is None or not client.broker_alive:
            return f"⚠️ No broker answers at `{self.config.broker_url}`.", []
        workers = client.workers()
        total_inflight = sum(w.inflight for w in workers)
        total_capacity = sum(w.capacity for w in workers)
        speed = sum(w.tokens_per_s for w in workers)
        summary = (
            f"**Broker** `{self.config.broker_url}` · v{info.version} · dispatch `{info.dispatch_method}` · "
            f"{len(workers)} worker(s) · {len(client.models())} model(s) · in flight {total_inflight}/{total_capacity}"
            f" · queued {info.queued} · {speed:.1f} tokens/s · updated {time.strftime('%H:%M:%S')}"
        )
        return summary, mesh_rows(workers)

    # ---------------------------------------------------------------- chat

    async def chat(
        self,
        message: str,
        conversation: Conversation | None,
        model: str | None,
        temperature: float,
        top_p: float,
        max_tokens: float,
        seed: str,
    ) -> AsyncIterator[tuple[str, list[dict[str, str]], Conversation]]:
        conversation = conversation if conversation is not None else Conversation()
        try:
            text = check_message(message)
            sampling = check_sampling(model, temperature, top_p, max_tokens, seed)
        except InputError as exc:
            conversation.turns.append(Turn("assistant", str(exc), error=True))
            yield message, render(conversation), conversation
            return
        conversation.turns.append(Turn("user", text))
        yield "", render(conversation), conversation
        async for shown in self._reply(conversation, sampling):
            yield "", shown, conversation

    async def regenerate(
        self,
        conversation: Conversation | None,
        model: str | None,
        temperature: float,
        top_p: float,
        max_tokens: float,
        seed: str,
    ) -> AsyncIterator[tuple[list[dict[str, str]], Conversation]]:
        conversation = conversation if conversation is not None else Conversation()
        while conversation.turns and conversation.turns[-1].role != "user":
            conversation.turns.pop()
        try:
            if not conversation.turns:
                raise InputError("Nothing to regenerate yet: send a message first.")
            sampling = check_sampling(model, temperature, top_p, max_tokens, seed)
        except InputError as exc:
            conversation.turns.append(Turn("assistant", str(exc), error=True))
            yield render(conversation), conversation
            return
        async for shown in self._reply(conversation, sampling):
            yield shown, conversation

    async def _reply(self, conversation: Conversation, sampling: Sampling) -> AsyncIterator[list[dict[str, str]]]:
        request = to_request(conversation, sampling)
        turn = Turn("assistant", "")
        conversation.turns.append(turn)
        conversation.model = sampling.model
        conversation.replies += 1
        mine = conversation.replies
        timing = ReplyTiming()
        start = time.monotonic()
        try:
            client = await self.link.client()
            async with contextlib.aclosing(client.generate(request)) as stream:
                async for chunk in stream:
                    if conversation.replies != mine:
                        return  # superseded; closing the stream cancels the request on its worker
                    now = time.monotonic()
                    if timing.ttft_s is None and (chunk.text or chunk.token_ids):
                        timing.ttft_s = now - start
                    timing.tokens += len(chunk.token_ids)
                    timing.elapsed_s = now - start
                    turn.text += chunk.text
                    if chunk.finish_reason is not None:
                        timing.worker_id = chunk.worker_id or ""
                        if chunk.usage is not None:
                            timing.tokens = chunk.usage.completion_tokens
                        turn.note = reply_note(timing)
                    yield render(conversation)
        except Exception as exc:  # every failure becomes a readable chat message
            if not isinstance(exc, MeshError):
                log.exception("reply failed")
            if conversation.replies != mine:
                return
            if not turn.text:
                conversation.turns.remove(turn)
            conversation.turns.append(Turn("assistant", error_text(exc, sampling.model), error=True))
            yield render(conversation)

    @staticmethod
    def clear(conversation: Conversation | None) -> tuple[list[dict[str, str]], Conversation, str]:
        conversation = conversation if conversation is not None else Conversation()
        conversation.turns.clear()
        conversation.replies += 1  # a reply still streaming stops: it must not write the old chat back
        return [], conversation, ""

    # ---------------------------------------------------------------- votes and flags

    def _feedback(self, kind: feedback.FeedbackKind, conversation: Conversation | None, request: gr.Request) -> str:
        exchange = conversation.last_exchange() if conversation is not None else []
        if not any(t.role == "assistant" and not t.error for t in exchange):
            return "Nothing to rate yet: vote or flag after a reply."
        user = getattr(request, "username", None) or ""
        ip = request.client.host if request is not None and request.client is not None else ""
        assert conversation is not None
        record = feedback.make_record(kind, conversation.model, exchange, user, ip, time.time())
        try:
            feedback.append(self.config.log_dir, record)
        except OSError as exc:
            log.warning("could not write feedback: %s", exc)
            return f"Could not record the {kind}: {exc.strerror or exc}."
        return {
            "upvote": "👍 Thanks, upvote recorded.",
            "downvote": "👎 Thanks, downvote recorded.",
            "flag": "⚠️ Flagged for review.",
        }[kind]

    def upvote(self, conversation: Conversation | None, request: gr.Request) -> str:
        return self._feedback("upvote", conversation, request)

    def downvote(self, conversation: Conversation | None, request: gr.Request) -> str:
        return self._feedback("downvote", conversation, request)

    def flag(self, conversation: Conversation | None, request: gr.Request) -> str:
        return self._feedback("flag", conversation, request)


def build_app(config: GradioConfig, link: MeshLink | None = None) -> gr.Blocks:
    """The UI: a Chat tab (named API endpoints /chat, /regenerate, /clear) and a live Mesh tab."""
    link = link or MeshLink(config.broker_url, config.security, config.request_timeout)
    h = _Handlers(config, link)
    private: Literal["private"] = "private"
    with gr.Blocks(title="llm-mesh chat", analytics_enabled=False) as demo:
        conversation = gr.State(None)
        with gr.Tab("Chat"):
            model = gr.Dropdown(label="Model", choices=[], value=None, interactive=True, allow_custom_value=True)
            chatbot = gr.Chatbot(label="llm-mesh", height=480, feedback_options=None, elem_id="chatbot")
            with gr.Row():
                message = gr.Textbox(
                    show_label=False, placeholder="Type a message and press Enter", scale=8, elem_id="message"
                )
                send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
            with gr.Row():
                upvote = gr.Button("Upvote")
                downvote = gr.Button("Downvote")
                flag = gr.Button("Flag")
                stop = gr.Button("Stop", elem_id="stop")
                regenerate = gr.Button("Regenerate")
                clear = gr.Button("Clear")
            notice = gr.Markdown("")
            with gr.Accordion("Parameters", open=False):
                temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature")
                top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top P")
                max_tokens = gr.Slider(1, MAX_OUTPUT_TOKENS, value=512, step=1, label="Max output tokens")
                seed = gr.Textbox(label="Seed (empty: random; the same seed gives the same reply)", value="")
        with gr.Tab("Mesh"):
            summary = gr.Markdown("")
            table = gr.Dataframe(headers=MESH_COLUMNS, value=[], interactive=False, wrap=True)
            timer = gr.Timer(MESH_REFRESH_S)

        params = [model, temperature, top_p, max_tokens, seed]
        chat_inputs = [message, conversation, *params]
        chat_outputs = [message, chatbot, conversation]
        # One pool for every event that generates: --concurrency-count bounds them together.
        pool = {"concurrency_id": "generate", "concurrency_limit": config.concurrency_count}
        submitted = message.submit(h.chat, chat_inputs, chat_outputs, api_name="chat", **pool)
        clicked = send.click(h.chat, chat_inputs, chat_outputs, api_visibility=private, **pool)
        regenerated = regenerate.click(
            h.regenerate, [conversation, *params], [chatbot, conversation], api_name="regenerate", **pool
        )
        stop.click(None, None, None, cancels=[submitted, clicked, regenerated], api_visibility=private)
        clear.click(h.clear, conversation, [chatbot, conversation, notice], api_name="clear")
        upvote.click(h.upvote, conversation, notice, api_visibility=private)
        downvote.click(h.downvote, conversation, notice, api_visibility=private)
        flag.click(h.flag, conversation, notice, api_visibility=private)

        demo.load(h.model_dropdown, model, model, api_visibility=private, concurrency_limit=None)
        demo.load(h.mesh_view, None, [summary, table], api_visibility=private, concurrency_limit=None)
        timer.tick(
            h.mesh_view, None, [summary, table], api_visibility=private, concurrency_limit=None, show_progress="hidden"
        )
    demo.mesh_link = link  # type: ignore[attr-defined]  # serve() closes it at shutdown
    return demo


def serve(config: GradioConfig) -> None:
    """Runs the UI until SIGINT or SIGTERM; Gradio serves from its own thread."""
    link = MeshLink(config.broker_url, config.security, config.request_timeout)
    demo = build_app(config, link)
    demo.queue(default_concurrency_limit=config.concurrency_count)
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    demo.launch(
        server_name=config.host,
        server_port=config.port,
        auth=list(config.auth) or None,
        root_path=config.root_path or None,
        share=config.share,
        max_threads=max(40, config.concurrency_count * 2),
        prevent_thread_lock=True,
        show_error=False,
        ssr_mode=False,
        quiet=True,
        footer_links=["api"],
    )
    log.info("Gradio UI on http://%s:%d%s (mesh %s)", config.host, config.port, config.root_path, config.broker_url)
    stopping.wait()
    log.info("stopping the Gradio UI")
    link.close_from_other_thread()
    demo.close()
