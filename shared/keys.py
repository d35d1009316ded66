"""ZeroMQ CURVE keys for tcp sockets (docs/deployment.md).

A keys folder, written by `krasis-coord keygen DIR`:

    krasis.key, krasis.key_secret   the cluster's key pair: the coordinator, every host agent and every
                                    stage serve and connect with it (copy the folder to each machine)
    client.key, client.key_secret   a client's key pair (Client(endpoint, keys=DIR) uses it)
    authorized/*.key                the public keys allowed to connect: krasis.key and client.key, plus
                                    one per client added with `keygen --client NAME DIR`

A client folder (`keygen --client NAME DIR` writes DIR/clients/NAME) holds only krasis.key and the
client's own pair, and is all that client needs. Every tcp socket gets CURVE when keys are given;
ipc sockets never travel off the host and stay plain. A bound (server) socket accepts only the keys
in authorized/, checked by pyzmq's authenticator (ZAP); a peer with any other key gets no answer.
"""

from __future__ import annotations

import ipaddress
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

CLUSTER, CLIENT, AUTHORIZED, CLIENTS = "krasis", "client", "authorized", "clients"


class KeysError(ValueError):
    """A keys folder that cannot be used; the text says what is missing."""


def keygen(root: str | Path) -> None:
    """A fresh keys folder: the cluster's pair, a client's pair, and authorized/ holding both publics."""
    root = Path(root)
    if (root / f"{CLUSTER}.key_secret").exists():
        raise KeysError(f"{root} already holds keys; remove it first or use --client NAME to add a client")
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)
    for name in (CLUSTER, CLIENT):
        zmq.auth.create_certificates(root, name)
        _authorize(root, root / f"{name}.key", name)


def add_client(root: str | Path, name: str) -> Path:
    """One more client: its own folder under clients/ (krasis.key and its pair), its public key
    authorized. Running processes read authorized/ when they start."""
    root = Path(root)
    _need(root / f"{CLUSTER}.key")
    out = root / CLIENTS / name
    if out.exists():
        raise KeysError(f"{out} exists already")
    out.mkdir(parents=True)
    pub, _ = zmq.auth.create_certificates(out, CLIENT)
    shutil.copy(root / f"{CLUSTER}.key", out / f"{CLUSTER}.key")
    _authorize(root, Path(pub), name)
    return out


def _authorize(root: Path, public: Path, name: str) -> None:
    (root / AUTHORIZED).mkdir(exist_ok=True)
    shutil.copy(public, root / AUTHORIZED / f"{name}.key")


def _need(path: Path) -> Path:
    if not path.exists():
        raise KeysError(f"{path} is missing (write a keys folder with `krasis-coord keygen DIR`)")
    return path


def is_loopback(endpoint: str) -> bool:
    """ipc and inproc endpoints, and tcp ones on a loopback address or `localhost`."""
    if not endpoint.startswith("tcp://"):
        return True
    host = urlsplit(endpoint).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name or `*`: whatever it resolves to, it may be reachable from outside
        return False


def require_keys(endpoints: list[str], keys: str | None, insecure: bool) -> None:
    """Refuse to expose a tcp socket beyond loopback without keys, unless told to."""
    if keys or insecure:
        return
    exposed = [e for e in endpoints if not is_loopback(e)]
    if exposed:
        raise KeysError(f"{exposed[0]} is reachable from other machines: give --keys DIR (krasis-coord keygen DIR) "
                        "or, on a network you trust, --insecure")


class Curve:
    """Binds and connects a context's sockets, with CURVE on tcp when a keys folder is given.
    `role` "cluster" serves and connects with the cluster's pair; "client" connects with the
    client's pair to the cluster's public key."""

    def __init__(self, ctx: zmq.Context, keys: str | None, role: str = "cluster"):
        self.ctx, self.keys, self.auth = ctx, Path(keys) if keys else None, None
        if self.keys is None:
            return
        own = CLUSTER if role == "cluster" else CLIENT
        self.public, self.secret = zmq.auth.load_certificate(_need(self.keys / f"{own}.key_secret"))
        self.server_public, _ = zmq.auth.load_certificate(_need(self.keys / f"{CLUSTER}.key"))

    def bind(self, sock: zmq.Socket, endpoint: str) -> None:
        if self.keys is not None and endpoint.startswith("tcp://"):
            self._authenticator()
            sock.curve_secretkey, sock.curve_publickey, sock.curve_server = self.secret, self.public, True
        sock.bind(endpoint)

    def connect(self, sock: zmq.Socket, endpoint: str) -> None:
        if self.keys is not None and endpoint.startswith("tcp://"):
            sock.curve_secretkey, sock.curve_publickey = self.secret, self.public
            sock.curve_serverkey = self.server_public
        sock.connect(endpoint)

    def _authenticator(self) -> None:
        """pyzmq's ZAP handler, on a thread of its own over this context (a shadow of it when the
        context is asyncio's), allowing only the keys in authorized/."""
        if self.auth is not None:
            return
        _need(self.keys / AUTHORIZED)
        self.auth = ThreadAuthenticator(zmq.Context.shadow(self.ctx.underlying))
        self.auth.start()
        self.auth.configure_curve(domain="*", location=str(self.keys / AUTHORIZED))

    def close(self) -> None:
        if self.auth is not None:
            self.auth.stop()
            self.auth = None
