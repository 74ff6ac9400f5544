"""`mesh gateway gradio` as a real process, driven by gradio_client.

The worker is the synthetic engine (fake tokens, no model): these tests check
the UI's plumbing (streaming, auth, errors, votes), not a model's text.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from gradio_client import Client

from tests.support import ProcessGroup, free_broker_url, free_port, wait_until

USER, PASSWORD = "alice", "s3cret"


def _page_up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def start_ui(
    processes: ProcessGroup,
    broker_url: str,
    tmp_path: Path,
    *extra: str,
    broker_args: tuple[str, ...] = (),
    worker_args: tuple[str, ...] = (),
) -> str:
    """Broker, one synthetic worker (fake tokens) serving `syn`, and the UI with a login; returns the UI's URL."""
    processes.broker(broker_url, *broker_args)
    processes.synthetic_worker(broker_url, "syn-1", "--itl-ms", "5", *worker_args, models="syn")
    auth = tmp_path / "users.txt"
    auth.write_text(f"# who may chat\n{USER}:{PASSWORD}\n")
    port = free_port()
    ui = processes.mesh(
        "gradio",
        "gateway",
        "gradio",
        "--broker",
        broker_url,
        "--port",
        str(port),
        "--gradio-auth-path",
        str(auth),
        "--log-dir",
        str(tmp_path / "votes"),
        "--model-list-mode",
        "reload",
        *extra,
    )
    url = f"http://127.0.0.1:{port}/"
    wait_until(lambda: _page_up(url) or not ui.alive(), timeout=120, interval=0.3, message="the UI page")
    assert ui.alive(), ui.output()
    return url


@dataclass(frozen=True)
class UI:
    url: str
    broker_url: str


@pytest.fixture(scope="module")
def shared_ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UI]:
    """One broker + synthetic worker + UI for the tests that leave them running (saves a UI start per test)."""
    workdir = tmp_path_factory.mktemp("gradio-ui")
    group = ProcessGroup(workdir)
    broker_url = free_broker_url()
    try:
        yield UI(start_ui(group, broker_url, workdir), broker_url)
    except BaseException:
        print(group.dump_logs())
        raise
    finally:
        group.stop_all()


def _reply_text(chatbot: list[dict]) -> str:  # type: ignore[type-arg]
    content = chatbot[-1]["content"]
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)


def test_chat_streams_a_reply_and_login_is_enforced(shared_ui: UI) -> None:
    url = shared_ui.url

    with pytest.raises(Exception, match=r"(?i)login|credentials|auth|401|403"):
        Client(url, auth=(USER, "wrong"), verbose=False)

    client = Client(url, auth=(USER, PASSWORD), verbose=False)
    # Enough tokens that the reply is seen growing even when the UI takes the waiting ones together.
    tokens = 400  # 2 s at 5 ms a token
    job = client.submit("Tell me a story", "syn", 0.7, 1.0, tokens, "7", api_name="/chat")
    updates = [outputs for outputs in job]
    job.result()
    replies = [_reply_text(chatbot) for _, chatbot in updates if chatbot and chatbot[-1]["role"] == "assistant"]
    # Streamed: the reply grew over several updates before it was complete.
    assert len({r for r in replies if r}) >= 3, updates
    final = _reply_text(job.outputs()[-1][1])
    assert "worker syn-1" in final and "first token" in final and "tokens/s" in final
    assert "Traceback" not in final

    # The same seed gives the same text again (the synthetic engine honours seeds like a real one).
    again = client.predict(model="syn", temperature=0.7, top_p=1.0, max_tokens=tokens, seed="7", api_name="/regenerate")
    assert _reply_text(again).split("\n\n<sub>")[0] == final.split("\n\n<sub>")[0]


def test_bad_input_gets_a_readable_message(shared_ui: UI) -> None:
    url = shared_ui.url
    client = Client(url, auth=(USER, PASSWORD), verbose=False)

    _, chatbot = client.predict("hi", "no-such-model", 0.7, 1.0, 16, "", api_name="/chat")
    assert "No worker serves the model 'no-such-model'" in _reply_text(chatbot)

    _, chatbot = client.predict("hi", "syn", 0.7, 1.0, 16, "not-a-number", api_name="/chat")
    assert "seed must be a whole number" in _reply_text(chatbot)

    # The worker refuses it (prompt + max_tokens over the context): the mesh's reason, in the chat.
    _, chatbot = client.predict("hi", "syn", 0.7, 1.0, 4096, "", api_name="/chat")
    assert "The mesh refused this request" in _reply_text(chatbot) and "context length" in _reply_text(chatbot)

    # Out of a slider's range: Gradio itself refuses it with a one-line reason.
    with pytest.raises(Exception, match="greater than maximum value 2"):
        client.predict("hi", "syn", 5.0, 1.0, 16, "", api_name="/chat")


def test_clear_resets_the_chat(shared_ui: UI) -> None:
    url = shared_ui.url
    client = Client(url, auth=(USER, PASSWORD), verbose=False)
    client.predict("one", "syn", 0.7, 1.0, 8, "", api_name="/chat")
    chatbot, _ = client.predict(api_name="/clear")
    assert chatbot == []
    _, chatbot = client.predict("two", "syn", 0.7, 1.0, 8, "", api_name="/chat")
    assert [m["role"] for m in chatbot] == ["user", "assistant"]


def test_votes_are_logged_as_json_lines(tmp_path: Path) -> None:
    from gateways.gradio import feedback
    from gateways.gradio.conversation import Turn

    exchange = [Turn("user", "hi"), Turn("assistant", "hello", note="worker w1"), Turn("assistant", "x", error=True)]
    record = feedback.make_record("upvote", "syn", exchange, "alice", "127.0.0.1", now=0.0)
    path = feedback.append(tmp_path, record)
    assert path.name == "1970-01-01-conv.json"
    line = json.loads(path.read_text().splitlines()[0])
    assert line["type"] == "upvote" and line["model"] == "syn" and len(line["messages"]) == 2


def _inflight_seen(broker_url: str, want_busy: bool, timeout: float) -> bool:
    """Whether the worker's announced in-flight count reaches (busy) or returns to (idle) the wanted state."""
    import asyncio

    from mesh.client import MeshClient

    async def watch() -> bool:
        async with MeshClient(broker_url) as client:
            await client.wait_for_broker(5)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                inflight = sum(w.inflight for w in client.workers())
                if (inflight > 0) == want_busy and client.workers():
                    return True
                await asyncio.sleep(0.05)
        return False

    return asyncio.run(watch())


def test_cancelling_a_reply_cancels_it_on_the_worker(shared_ui: UI) -> None:
    url, broker_url = shared_ui.url, shared_ui.broker_url
    client = Client(url, auth=(USER, PASSWORD), verbose=False)
    # 3000 fake tokens 5 ms apart: about 15 s unless cancelled.
    job = client.submit("a long one", "syn", 0.7, 1.0, 3000, "", api_name="/chat")
    assert _inflight_seen(broker_url, want_busy=True, timeout=30)
    job.cancel()
    assert _inflight_seen(broker_url, want_busy=False, timeout=15), "the request kept running on the worker"


def test_clear_or_regenerate_stops_the_reply_still_streaming(shared_ui: UI) -> None:
    url, broker_url = shared_ui.url, shared_ui.broker_url
    client = Client(url, auth=(USER, PASSWORD), verbose=False)
    client.submit("a long one", "syn", 0.7, 1.0, 3000, "", api_name="/chat")
    assert _inflight_seen(broker_url, want_busy=True, timeout=30)
    chatbot, _ = client.predict(api_name="/clear")
    assert chatbot == []
    assert _inflight_seen(broker_url, want_busy=False, timeout=15), "the cleared reply kept running"
    # The old reply did not write the old chat back: there is nothing to regenerate.
    chatbot = client.predict("syn", 0.7, 1.0, 8, "", api_name="/regenerate")
    assert "Nothing to regenerate" in _reply_text(chatbot)

    client.predict(api_name="/clear")
    client.submit("another long one", "syn", 0.7, 1.0, 3000, "", api_name="/chat")
    assert _inflight_seen(broker_url, want_busy=True, timeout=30)
    chatbot = client.predict("syn", 0.7, 1.0, 8, "", api_name="/regenerate")
    assert [m["role"] for m in chatbot] == ["user", "assistant"] and _reply_text(chatbot)
    assert _inflight_seen(broker_url, want_busy=False, timeout=15), "the superseded reply kept running"


def test_overloaded_and_worker_lost_are_readable(processes: ProcessGroup, broker_url: str, tmp_path: Path) -> None:
    # One slot and no queue: a second chat is refused at once; then the busy worker is killed mid-reply.
    url = start_ui(processes, broker_url, tmp_path, broker_args=("--max-queue", "0"), worker_args=("--capacity", "1"))
    client = Client(url, auth=(USER, PASSWORD), verbose=False)
    first = client.submit("a long one", "syn", 0.7, 1.0, 3000, "", api_name="/chat")
    assert _inflight_seen(broker_url, want_busy=True, timeout=30)

    other = Client(url, auth=(USER, PASSWORD), verbose=False)
    _, chatbot = other.predict("me too", "syn", 0.7, 1.0, 8, "", api_name="/chat")
    assert "busy" in _reply_text(chatbot), _reply_text(chatbot)

    worker = next(p for p in processes.processes if p.name == "worker-syn-1")
    worker.kill()
    _, chatbot = first.result(timeout=60)
    text = _reply_text(chatbot)
    assert "went away before it finished" in text and "Traceback" not in text, text
    # The part of the reply that did arrive stays above the error.
    assert chatbot[-2]["role"] == "assistant" and _reply_text(chatbot[:-1])

    # The broker goes away too: the chat says so instead of hanging or crashing.
    processes.processes[0].stop()
    _, chatbot = client.predict("still there?", "syn", 0.7, 1.0, 16, "", api_name="/chat")
    text = _reply_text(chatbot)
    assert text.startswith("⚠️") and "Traceback" not in text, text


def test_chat_decisions_are_pure_functions() -> None:
    from gateways.gradio.conversation import (
        Conversation,
        InputError,
        ReplyTiming,
        Turn,
        check_sampling,
        parse_seed,
        reply_note,
        to_request,
    )

    assert parse_seed("") is None and parse_seed("42") == 42 and parse_seed(7.0) == 7
    for bad in ("x", "1.5", "-1"):
        with pytest.raises(InputError):
            parse_seed(bad)
    with pytest.raises(InputError, match="Choose a model"):
        check_sampling(None, 0.7, 1.0, 16, "")
    with pytest.raises(InputError, match="Top-p"):
        check_sampling("m", 0.7, 0.0, 16, "")

    chat = Conversation([Turn("user", "hi"), Turn("assistant", "oops", error=True), Turn("user", "again")])
    request = to_request(chat, check_sampling("m", 0.5, 0.9, 32, "3"))
    assert [(m.role, m.content) for m in request.messages or []] == [("user", "hi"), ("user", "again")]
    assert (request.model, request.max_tokens, request.temperature, request.seed) == ("m", 32, 0.5, 3)

    note = reply_note(ReplyTiming(worker_id="w1", ttft_s=0.1, elapsed_s=1.1, tokens=11))
    assert note == "worker w1 · first token 100 ms · 10.0 tokens/s · 11 tokens"


def test_auth_file_keeps_what_follows_the_colon(tmp_path: Path) -> None:
    from gateways.gradio.cli import read_auth_file

    auth = tmp_path / "users.txt"
    auth.write_bytes(b"# who may chat\n\nalice:ends in a space \n  bob : two  \r\n   \n  # indented comment\n")
    assert read_auth_file(auth) == (("alice", "ends in a space "), ("bob", " two  "))
    auth.write_text("carol:   \n")
    with pytest.raises(ValueError, match=":1: expected user:password"):
        read_auth_file(auth)


def test_ui_open_to_others_without_a_login_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    from gateways.gradio.cli import warn_when_open

    login = ((USER, PASSWORD),)
    assert not warn_when_open("127.0.0.1", share=False, auth=())
    assert not warn_when_open("0.0.0.0", share=False, auth=login)
    assert not caplog.records
    assert warn_when_open("0.0.0.0", share=False, auth=())
    assert warn_when_open("127.0.0.1", share=True, auth=())
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2 and "0.0.0.0 with no --gradio-auth-path" in warnings[0], warnings
    assert "gradio.live" in warnings[1]
