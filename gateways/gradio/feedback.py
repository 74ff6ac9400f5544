"""Votes and flags, one JSON object per line in --log-dir (FastChat's conv log, typed)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from gateways.gradio.conversation import Turn

FeedbackKind = Literal["upvote", "downvote", "flag"]


@dataclass(frozen=True, slots=True)
class FeedbackRecord:
    tstamp: float
    type: FeedbackKind
    model: str
    messages: list[dict[str, str]]
    user: str
    ip: str


def make_record(kind: FeedbackKind, model: str, exchange: list[Turn], user: str, ip: str, now: float) -> FeedbackRecord:
    messages = [{"role": t.role, "content": t.text, "note": t.note} for t in exchange if not t.error]
    return FeedbackRecord(now, kind, model, messages, user, ip)


def log_path(log_dir: Path, now: float) -> Path:
    """One file per day, like FastChat's `YYYY-MM-DD-conv.json`."""
    return log_dir / f"{time.strftime('%Y-%m-%d', time.gmtime(now))}-conv.json"


def append(log_dir: Path, record: FeedbackRecord) -> Path:
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_path(log_dir, record.tstamp)
    line = memoryview((json.dumps(asdict(record), ensure_ascii=False) + "\n").encode())
    # One write on an O_APPEND descriptor: votes written at once (Gradio runs handlers on a thread pool,
    # and two UIs may share a folder) each land whole, with no buffering layer between to split them.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        while line:
            line = line[os.write(fd, line) :]
    finally:
        os.close(fd)
    return path
