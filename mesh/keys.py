"""`mesh keys`: CURVE key folders for a mesh, one folder per process.

    mesh keys init DIR                                   broker keys, worker-1, client-1
    mesh keys init DIR --workers 2 --client gateway      broker keys, worker-1, worker-2, gateway
    mesh keys init DIR --worker gpu-a --client gateway   broker keys, gpu-a, gateway (names replace numbers)
    mesh keys add DIR --worker gpu-c                     a new node, admitted by a running broker at once

Layout (see mesh.security):

    DIR/broker/                 --keys for `mesh broker` (its key pair and allow/workers, allow/clients)
    DIR/workers/NAME/           --keys for `mesh worker` (its key pair and the broker's public key)
    DIR/clients/NAME/           --keys for `mesh status`, `mesh generate`, gateways

Revoke a node by deleting DIR/broker/allow/{workers,clients}/NAME.key: new
connections with that key are refused from then on. Copy only a node's own
folder to its machine: secret keys never need to leave the folder they were
made in.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import zmq.auth

from mesh.security import BROKER_KEY, NODE_KEY, Role, allow_list_dir

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_FOLDER_FOR: dict[Role, str] = {"workers": "workers", "clients": "clients"}


class KeysError(ValueError):
    """A key folder request that cannot be carried out."""


@dataclass(frozen=True, slots=True)
class Node:
    role: Role
    name: str


def broker_dir(root: Path) -> Path:
    return root / "broker"


def node_dir(root: Path, node: Node) -> Path:
    return root / _FOLDER_FOR[node.role] / node.name


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def _key_pair(folder: Path, name: str) -> Path:
    """Writes NAME.key and NAME.key_secret (owner-only) into folder; returns the public file."""
    public, secret = zmq.auth.create_certificates(folder, name)
    Path(secret).chmod(0o600)
    return Path(public)


def plan_nodes(
    workers: int, clients: int, worker_names: list[str], client_names: list[str], root: Path | None = None
) -> list[Node]:
    """The nodes to create: numbered ones (worker-1, ...; after those already in `root`) and named
    ones, each name checked and unique."""
    nodes = [Node("workers", name) for name in _numbered(root, "workers", "worker", workers)]
    nodes += [Node("clients", name) for name in _numbered(root, "clients", "client", clients)]
    nodes += [Node("workers", n) for n in worker_names] + [Node("clients", n) for n in client_names]
    seen: set[tuple[str, str]] = set()
    for node in nodes:
        if not _NAME.match(node.name):
            raise KeysError(f"node name {node.name!r}: use letters, digits, '.', '_' or '-' (64 at most)")
        if (node.role, node.name) in seen:
            raise KeysError(f"{node.role[:-1]} {node.name!r} is listed twice")
        seen.add((node.role, node.name))
    return nodes


def _numbered(root: Path | None, folder: str, prefix: str, count: int) -> list[str]:
    names: list[str] = []
    number = 1
    while len(names) < count:
        name = f"{prefix}-{number}"
        if root is None or not (root / folder / name).exists():
            names.append(name)
        number += 1
    return names


def init_keys(root: Path, nodes: list[Node], force: bool = False) -> None:
    """Creates the broker's key pair, its allow-lists and one folder per node."""
    broker = broker_dir(root)
    if broker.exists():
        if not force:
            raise KeysError(f"{broker} exists already: use `mesh keys add` for new nodes, or --force to start over")
        for sub in ("broker", "workers", "clients"):
            shutil.rmtree(root / sub, ignore_errors=True)
    _private_dir(root)
    _private_dir(broker)
    _key_pair(broker, BROKER_KEY)
    for role in ("workers", "clients"):
        _private_dir(allow_list_dir(broker, role))
    add_nodes(root, nodes)


def add_nodes(root: Path, nodes: list[Node]) -> list[Path]:
    """Creates each node's folder and puts its public key on the broker's allow-list (last, so
    the running broker admits a node only once its folder is complete)."""
    broker = broker_dir(root)
    broker_public = broker / f"{BROKER_KEY}.key"
    if not broker_public.is_file():
        raise KeysError(f"{broker} holds no broker keys: run `mesh keys init {root}` first")
    made = []
    for node in nodes:
        folder = node_dir(root, node)
        if folder.exists():
            raise KeysError(f"{folder} exists already")
    for node in nodes:
        folder = _private_dir(node_dir(root, node))
        public = _key_pair(folder, NODE_KEY)
        shutil.copyfile(broker_public, folder / f"{BROKER_KEY}.key")
        allowed = allow_list_dir(broker, node.role) / f"{node.name}.key"
        tmp = allowed.with_suffix(".tmp")
        shutil.copyfile(public, tmp)
        os.replace(tmp, allowed)  # atomic: the broker never reads half a file
        made.append(folder)
    return made


# ---------------------------------------------------------------------- CLI


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "keys",
        help="create CURVE key folders (encryption and allow-lists) for a mesh",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    keys_sub = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")

    init = keys_sub.add_parser("init", help="create the broker's keys, its allow-lists and node folders")
    init.add_argument("dir", type=Path, metavar="DIR", help="the folder to create")
    _node_options(init, default_workers=1, default_clients=1)
    init.add_argument("--force", action="store_true", help="replace existing keys (every node needs new ones)")
    init.set_defaults(run=_run_init)

    add = keys_sub.add_parser("add", help="add node folders to an existing DIR (a running broker admits them)")
    add.add_argument("dir", type=Path, metavar="DIR", help="a folder made by `mesh keys init`")
    _node_options(add, default_workers=0, default_clients=0)
    add.set_defaults(run=_run_add)


def _node_options(p: argparse.ArgumentParser, default_workers: int, default_clients: int) -> None:
    # --workers and --clients stay None when not given: named folders then replace the numbered default.
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help=f"numbered worker folders worker-1..N ({_count_default(default_workers, '--worker')})",
    )
    p.add_argument(
        "--clients",
        type=int,
        metavar="N",
        help=f"numbered client folders client-1..N ({_count_default(default_clients, '--client')})",
    )
    p.add_argument("--worker", action="append", default=[], metavar="NAME", help="a named worker folder (repeatable)")
    p.add_argument(
        "--client", action="append", default=[], metavar="NAME", help="a named client folder, e.g. gateway (repeatable)"
    )
    p.set_defaults(default_workers=default_workers, default_clients=default_clients)


def _count_default(count: int, named_flag: str) -> str:
    return f"default: {count}, or 0 with {named_flag}" if count else "default: 0"


def _nodes(args: argparse.Namespace) -> list[Node]:
    """Named folders are what the user asked for: `--client gateway` makes no client-1 besides it
    unless --clients says so."""
    workers = args.workers if args.workers is not None else (0 if args.worker else args.default_workers)
    clients = args.clients if args.clients is not None else (0 if args.client else args.default_clients)
    if workers < 0 or clients < 0:
        raise KeysError("--workers and --clients must be 0 or more")
    return plan_nodes(workers, clients, args.worker, args.client, args.dir)


def _print_usage(root: Path, nodes: list[Node]) -> None:
    print(f"broker:  mesh broker --keys {broker_dir(root)} ...")
    for node in nodes:
        command = "worker" if node.role == "workers" else "status|generate|gateway"
        print(f"{node.role[:-1]:7s}  mesh {command} --keys {node_dir(root, node)} ...")


def _run_init(args: argparse.Namespace) -> int:
    try:
        nodes = _nodes(args)
        init_keys(args.dir, nodes, force=args.force)
    except (KeysError, OSError) as exc:
        print(f"mesh keys init: {exc}", file=sys.stderr)
        return 2
    _print_usage(args.dir, nodes)
    return 0


def _run_add(args: argparse.Namespace) -> int:
    try:
        nodes = _nodes(args)
        if not nodes:
            raise KeysError("nothing to add: give --worker NAME, --client NAME, --workers N or --clients N")
        add_nodes(args.dir, nodes)
    except (KeysError, OSError) as exc:
        print(f"mesh keys add: {exc}", file=sys.stderr)
        return 2
    _print_usage(args.dir, nodes)
    return 0
