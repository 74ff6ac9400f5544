"""Every endpoint of a mesh derives from the one broker URL a user knows.

--broker tcp://HOST:PORT    front   ROUTER, clients       PORT
                            back    ROUTER, workers       PORT + 1
                            bus_in  XSUB, workers publish PORT + 2
                            bus_out XPUB, anyone listens  PORT + 3
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

DEFAULT_BROKER_URL = "tcp://127.0.0.1:21001"
PORTS_PER_BROKER = 4
MAX_BROKER_PORT = 65535 - (PORTS_PER_BROKER - 1)


class EndpointError(ValueError):
    """A broker URL that cannot be used."""


@dataclass(frozen=True, slots=True)
class Endpoints:
    host: str
    port: int

    @classmethod
    def from_url(cls, url: str) -> Endpoints:
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:  # urllib: not a number, or outside 0-65535
            port = -1
        if parts.scheme != "tcp" or not parts.hostname or port is None:
            raise EndpointError(f"broker URL must look like tcp://HOST:PORT, got {url!r}")
        if not 0 < port <= MAX_BROKER_PORT:
            raise EndpointError(
                f"broker URL {url!r}: PORT must be a number from 1 to {MAX_BROKER_PORT}, since the broker "
                f"uses it and the {PORTS_PER_BROKER - 1} after it"
            )
        return cls(parts.hostname, port)

    def _url(self, offset: int) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port + offset}"

    @property
    def front(self) -> str:
        return self._url(0)

    @property
    def back(self) -> str:
        return self._url(1)

    @property
    def bus_in(self) -> str:
        return self._url(2)

    @property
    def bus_out(self) -> str:
        return self._url(3)

    def as_dict(self) -> dict[str, str]:
        return {"front": self.front, "back": self.back, "bus_in": self.bus_in, "bus_out": self.bus_out}

    @property
    def is_loopback(self) -> bool:
        return is_loopback_host(self.host)


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)
