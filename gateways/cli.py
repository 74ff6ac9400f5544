"""`mesh gateway ...`: each gateway registers its own subcommand."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from gateways.gradio.cli import register as register_gradio
    from gateways.openai.cli import register as register_openai

    gateway = sub.add_parser("gateway", help="run a gateway into the mesh (openai, gradio)")
    kinds = gateway.add_subparsers(dest="gateway", required=True, metavar="GATEWAY")
    register_openai(kinds)
    register_gradio(kinds)
