"""`mesh gateway openai` (not built yet)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("openai", help="(not built yet)")
