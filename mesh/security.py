"""Who may join the mesh: the loopback rule, and CURVE keys with ZAP allow-lists.

A mesh that binds only loopback needs nothing. Binding anywhere else requires
CURVE keys (``--keys DIR``) or an explicit ``--insecure``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import zmq

from mesh.endpoints import Endpoints

#: The ZAP domain (and allow-list) that guards each kind of peer.
Role = Literal["workers", "clients"]


class InsecureBindError(RuntimeError):
    """A non-loopback bind with neither keys nor --insecure."""


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


def secure_server(socket: zmq.Socket, security: SecurityConfig, role: Role) -> None:
    """Makes a bound socket a CURVE server that admits only `role`'s allow-list."""
    if security.curve:
        raise NotImplementedError("CURVE keys are not supported yet")


def secure_client(socket: zmq.Socket, security: SecurityConfig) -> None:
    """Makes a connecting socket a CURVE client with this node's keys."""
    if security.curve:
        raise NotImplementedError("CURVE keys are not supported yet")
