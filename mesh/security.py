"""Who may join the mesh: the loopback rule, and CURVE keys with ZAP allow-lists.

A mesh that binds only loopback needs nothing. Binding anywhere else requires
CURVE keys (``--keys DIR``) or an explicit ``--insecure``.

Key folders (made by ``mesh keys init``; each process gets exactly one):

    DIR/broker/                      mesh broker --keys DIR/broker
        broker.key, broker.key_secret    the broker's key pair
        allow/workers/NAME.key           public keys admitted on back and bus_in
        allow/clients/NAME.key           public keys admitted on front and bus_out
    DIR/workers/NAME/                mesh worker --keys DIR/workers/NAME
    DIR/clients/NAME/                mesh status|generate|gateway --keys DIR/clients/NAME
        node.key, node.key_secret        this node's key pair
        broker.key                       the broker's public key (verified by CURVE itself)

The broker runs one ZAP authenticator on the context of its sockets; every
bound socket's ZAP domain is its role ("workers" or "clients"), checked
against that role's allow-list. The allow-lists are re-read when their files
change (checked on each handshake), so adding or removing a key needs no
restart; a peer already connected stays connected until it reconnects.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from mesh.endpoints import Endpoints

log = logging.getLogger("mesh.security")

#: The ZAP domain (and allow-list) that guards each kind of peer.
Role = Literal["workers", "clients"]
ROLES: tuple[Role, ...] = ("workers", "clients")

BROKER_KEY = "broker"  # broker.key / broker.key_secret
NODE_KEY = "node"  # node.key / node.key_secret
ALLOW_DIR = "allow"
#: Seconds between two log lines about the same refused key (each refusal is counted).
REFUSAL_LOG_INTERVAL = 10.0
#: Seconds between re-reads of an allow-list folder when messages are checked against it.
ADMIT_REFRESH_S = 0.5


class InsecureBindError(RuntimeError):
    """A non-loopback bind with neither keys nor --insecure."""


class KeyMaterialError(ValueError):
    """A --keys folder that lacks what this process needs."""


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    keys_dir: Path | None = None
    insecure: bool = False

    @property
    def curve(self) -> bool:
        return self.keys_dir is not None


def check_bind_allowed(endpoints: Endpoints, security: SecurityConfig) -> None:
    if endpoints.is_loopback or security.curve or security.insecure:
        return
    raise InsecureBindError(
        f"refusing to bind {endpoints.host}, which is not a loopback address, without encryption: "
        "anyone who can reach it could join as a worker or submit work. "
        "Create keys with `mesh keys init DIR` and pass --keys DIR, "
        "or pass --insecure to accept the risk."
    )


# --------------------------------------------------------------------------- key files


def _load(path: Path, *, secret: bool, what: str) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise KeyMaterialError(f"{what}: {path} is missing")
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise KeyMaterialError(f"{what}: cannot read {path}: {exc}") from None
    if secret and secret_key is None:
        raise KeyMaterialError(f"{what}: {path} holds no secret key")
    return public, secret_key


def load_broker_keys(keys_dir: Path) -> tuple[bytes, bytes]:
    """The broker's (public, secret) key pair from its folder."""
    path = keys_dir / f"{BROKER_KEY}.key_secret"
    if not path.is_file() and (keys_dir / f"{NODE_KEY}.key_secret").is_file():
        raise KeyMaterialError(f"{keys_dir} holds a node's keys; the broker needs DIR/broker from `mesh keys init`")
    public, secret = _load(path, secret=True, what="broker keys")
    assert secret is not None
    return public, secret


def load_node_keys(keys_dir: Path) -> tuple[bytes, bytes, bytes]:
    """A worker's or client's (public, secret, broker public) keys from its folder."""
    path = keys_dir / f"{NODE_KEY}.key_secret"
    if not path.is_file() and (keys_dir / f"{BROKER_KEY}.key_secret").is_file():
        raise KeyMaterialError(
            f"{keys_dir} holds the broker's keys; a worker or client needs DIR/workers/NAME or DIR/clients/NAME"
        )
    public, secret = _load(path, secret=True, what="node keys")
    broker_public, _ = _load(keys_dir / f"{BROKER_KEY}.key", secret=False, what="the broker's public key")
    assert secret is not None
    return public, secret, broker_public


def allow_list_dir(keys_dir: Path, role: Role) -> Path:
    return keys_dir / ALLOW_DIR / role


def read_allow_list(folder: Path) -> frozenset[bytes]:
    """The z85 public keys of every *.key file in an allow-list folder (unreadable files are skipped)."""
    keys: set[bytes] = set()
    for path in sorted(folder.glob("*.key")) if folder.is_dir() else ():
        try:
            public, _ = zmq.auth.load_certificate(path)
        except (OSError, ValueError) as exc:
            log.error("ignoring allow-list entry %s: %s", path, exc)
            continue
        keys.add(public)
    return frozenset(keys)


def _folder_signature(folder: Path) -> tuple[object, ...]:
    """Changes whenever a key file is added, removed or rewritten."""
    try:
        entries = sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in folder.glob("*.key"))
        return (folder.stat().st_mtime_ns, tuple(entries))
    except OSError:
        return ()


# --------------------------------------------------------------------------- sockets


def secure_server(socket: zmq.Socket, security: SecurityConfig, role: Role) -> None:
    """Makes a bound socket a CURVE server that admits only `role`'s allow-list."""
    if not security.curve:
        return
    assert security.keys_dir is not None
    public, secret = load_broker_keys(security.keys_dir)
    socket.curve_publickey = public
    socket.curve_secretkey = secret
    socket.curve_server = True
    # The ZAP handler (Gatekeeper) checks the peer against this domain's list.
    socket.zap_domain = role.encode()


def secure_client(socket: zmq.Socket, security: SecurityConfig) -> None:
    """Makes a connecting socket a CURVE client with this node's keys."""
    if not security.curve:
        return
    assert security.keys_dir is not None
    public, secret, broker_public = load_node_keys(security.keys_dir)
    socket.curve_publickey = public
    socket.curve_secretkey = secret
    # CURVE refuses a server without this secret key: the broker is verified by construction.
    socket.curve_serverkey = broker_public


# --------------------------------------------------------------------------- ZAP


#: Refused keys remembered (to log each once per interval): anyone with the broker's public key can
#: offer fresh key pairs without end, and must not grow the broker's memory with them.
MAX_REFUSED_KEYS_REMEMBERED = 1024


class _AllowList:
    """One role's admitted keys, re-read when its folder changes; called on the ZAP thread."""

    def __init__(self, role: Role, folder: Path) -> None:
        self.role = role
        self.folder = folder
        self._signature: tuple[object, ...] | None = None
        self._keys: frozenset[bytes] = frozenset()
        self._lock = threading.Lock()
        self._refused: dict[bytes, tuple[float, int]] = {}  # key -> (last logged, refusals since)
        self.refusals = 0
        #: Times a reload found keys taken off the list.
        self.revocations = 0
        self._checked_at = float("-inf")
        self.refresh()

    def refresh(self) -> None:
        with self._lock:
            signature = _folder_signature(self.folder)
            if signature == self._signature:
                return
            first = self._signature is None
            self._signature = signature
            keys = read_allow_list(self.folder)
            if not first and keys != self._keys:
                log.info("allow-list %s reloaded: %d key(s)", self.role, len(keys))
                if self._keys - keys:
                    self.revocations += 1
            self._keys = keys

    @property
    def size(self) -> int:
        return len(self._keys)

    def refresh_if_due(self) -> None:
        """refresh(), at most every ADMIT_REFRESH_S."""
        now = time.monotonic()
        if now - self._checked_at >= ADMIT_REFRESH_S:
            self._checked_at = now
            self.refresh()

    def admits(self, key: bytes) -> bool:
        """Whether `key` (z85) is on the list now."""
        self.refresh_if_due()
        return key in self._keys

    def callback(self, domain: str, key: bytes) -> bool:
        self.refresh()
        if key in self._keys:
            return True
        self._log_refusal(key)
        return False

    def _log_refusal(self, key: bytes) -> None:
        # Every refusal is counted; a peer retrying in a loop is logged once per interval.
        self.refusals += 1
        now = time.monotonic()
        if key not in self._refused and len(self._refused) >= MAX_REFUSED_KEYS_REMEMBERED:
            self._forget_refusals(now)
        last, since = self._refused.get(key, (float("-inf"), 0))
        if now - last >= REFUSAL_LOG_INTERVAL:
            more = f" ({since} more refusal(s) since the last report)" if since else ""
            log.warning(
                "refused a connection on %s: public key %s is not on allow/%s%s",
                self.role,
                key.decode(errors="replace"),
                self.role,
                more,
            )
            self._refused[key] = (now, 0)
        else:
            self._refused[key] = (last, since + 1)

    def _forget_refusals(self, now: float) -> None:
        """Room for a new key: those not logged within the interval go (they would be logged
        afresh anyway), then, against a flood of fresh keys, the older half."""
        recent = {k: v for k, v in self._refused.items() if now - v[0] < REFUSAL_LOG_INTERVAL}
        if len(recent) >= MAX_REFUSED_KEYS_REMEMBERED:
            recent = dict(list(recent.items())[len(recent) // 2 :])
        self._refused = recent

    @property
    def refused_keys_remembered(self) -> int:
        return len(self._refused)


class _HandshakeWatch:
    """Logs handshakes that fail before ZAP is asked (a peer without CURVE, or with another
    mesh's broker key), read from socket monitors on a thread of its own."""

    EVENTS = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL

    def __init__(self) -> None:
        self._monitors: list[tuple[zmq.Socket, Role]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_logged: dict[tuple[str, str], float] = {}
        self.failures = 0

    def add(self, socket: zmq.Socket, role: Role) -> None:
        self._monitors.append((socket.get_monitor_socket(self.EVENTS), role))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mesh-handshake-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        from zmq.utils.monitor import recv_monitor_message

        poller = zmq.Poller()
        roles = {}
        for monitor, role in self._monitors:
            poller.register(monitor, zmq.POLLIN)
            roles[monitor] = role
        try:
            while not self._stop.is_set():
                for monitor, _ in poller.poll(200):
                    event = recv_monitor_message(monitor)
                    if event["event"] & self.EVENTS:
                        self._log(roles[monitor], event["endpoint"].decode(errors="replace"))
        finally:
            for monitor, _ in self._monitors:
                monitor.close(linger=0)

    def _log(self, role: Role, endpoint: str) -> None:
        self.failures += 1
        now = time.monotonic()
        if now - self._last_logged.get((role, endpoint), float("-inf")) >= REFUSAL_LOG_INTERVAL:
            self._last_logged[(role, endpoint)] = now
            log.warning(
                "refused a connection on %s (%s): CURVE handshake failed, the peer has no keys "
                "or another mesh's broker key",
                role,
                endpoint,
            )


class Gatekeeper:
    """The broker's ZAP authenticator: one allow-list per role, on the broker's own context.

    start() must run before the first bind (ZAP requests to a missing handler
    are refused), and stop() before the context terminates. watch() adds a bound
    socket whose failed handshakes (those ZAP never sees) are logged too.
    """

    def __init__(self, context: zmq.Context, keys_dir: Path) -> None:
        load_broker_keys(keys_dir)  # fail at start-up, with a clear message, not at the first handshake
        self.allow_lists = {role: _AllowList(role, allow_list_dir(keys_dir, role)) for role in ROLES}
        self._auth = ThreadAuthenticator(context, log=logging.getLogger("mesh.security.zap"))
        self._handshakes = _HandshakeWatch()
        self._started = False

    def start(self) -> None:
        self._auth.start()
        for role, allow_list in self.allow_lists.items():
            self._auth.configure_curve_callback(role, allow_list)
        self._started = True
        counts = ", ".join(f"{a.size} {role}" for role, a in self.allow_lists.items())
        log.info("CURVE on: admitting %s", counts)

    def watch(self, sockets: dict[zmq.Socket, Role]) -> None:
        """Starts logging failed handshakes on these bound sockets (call once, after binding)."""
        for socket, role in sockets.items():
            self._handshakes.add(socket, role)
        self._handshakes.start()

    def stop(self) -> None:
        """Stops the watch and the authenticator; call after closing the sockets (a CURVE socket
        without a ZAP handler admits any peer that knows the broker's key)."""
        self._handshakes.stop()
        if self._started:
            self._auth.stop()
            self._started = False

    @property
    def refusals(self) -> int:
        return sum(a.refusals for a in self.allow_lists.values()) + self._handshakes.failures

    def revocations(self, role: Role) -> int:
        """How many times keys have been taken off `role`'s list (re-read if due): a change means a
        peer that passed ZAP at its handshake may no longer be allowed."""
        allow_list = self.allow_lists[role]
        allow_list.refresh_if_due()
        return allow_list.revocations

    def admits(self, role: Role, user_id: str | None) -> bool:
        """Whether a message's sender (its ZAP User-Id, a z85 key) is still on `role`'s list: a key
        taken off the list stops a peer that connected before, at its next message."""
        return user_id is not None and self.allow_lists[role].admits(user_id.encode())


def gatekeeper_for(context: zmq.Context, security: SecurityConfig) -> Gatekeeper | None:
    """The broker's authenticator when it runs with keys; None on a plain mesh."""
    if not security.curve:
        return None
    assert security.keys_dir is not None
    return Gatekeeper(context, security.keys_dir)
