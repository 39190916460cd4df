"""Group commit on SQLite: the writer holding the lock commits for the others.

Every reserve and every settle must be on disk before it returns. On SQLite
that is an fsync of the WAL per commit, and, worse with several processes,
a cold page cache: in WAL mode a connection empties its cache whenever
another connection has committed, so writers taking turns re-read their
B-tree pages on every transaction. Writers of one database file on one
machine therefore form a group:

- The first writer to bind the group's socket leads. It takes its turn in
  the ``WriterQueue`` and the write lock (``BEGIN IMMEDIATE``), runs its own
  step and the steps other writers sent it, each in a savepoint of the one
  transaction, commits once and only then answers each: an answer always
  means the change is on disk. While more requests wait it runs another
  round, for up to ``LEAD_FOR_S``, then closes the socket.
- Every other writer connects, sends its step (a name and a JSON body), and
  waits for the answer; it keeps the connection for its next step, until
  that leader stops leading.

A step is ``step(cursor, body) -> JSON value``, registered by name. It
decides under the write lock from what it reads and writes nothing before
it refuses; a refusal is an answer, not an error.

Failures lose nothing and double nothing:

- A writer whose connection closes before an answer runs its step again
  from the start (it may lead this time). Every step is idempotent on its
  reservation key, so if the leader died after its commit, the second run
  finds the reservation made, or settled, and returns it.
- A leader that cannot commit rolls back and answers every request of the
  round with the error: nothing was changed.
- A request carries its writer's deadline. A leader that reaches it too
  late (it waited for its own turn) answers that it expired, without
  running it, so a writer that gave up never has its step run afterwards.

The socket lives in Linux's abstract namespace, named after the database
file's device and inode: it goes away with the process that bound it, so
a crashed leader leaves nothing behind, and only connections from the same
user are served. Elsewhere than Linux there is no group and writers take
turns one commit each.
"""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

__all__ = ["LEAD_FOR_S", "Leadership", "Request", "WriteGroup"]

# Version of the messages below; groups of other versions never meet.
PROTOCOL = 1
# How long one writer keeps leading while requests keep coming. Its own
# caller waits that long at most; its page cache stays warm meanwhile.
LEAD_FOR_S = 0.1
# How long past its own deadline a writer waits for the answer of a step
# the leader may already have committed.
ANSWER_GRACE_S = 5.0
# The longest a leader waits for the rest of a request it has begun to read.
_READ_TIMEOUT_S = 1.0
_HEADER = struct.Struct("!I")
_MAX_FRAME = 1 << 20
_CREDENTIALS = struct.Struct("3i")

# The sockets of this process's leaders, closed in a forked child: a child
# that kept them would hold the group's name with nobody answering, and keep
# writers waiting on connections their leader has closed.
_LEADING: weakref.WeakSet[socket.socket] = weakref.WeakSet()


def _close_inherited_leaders() -> None:
    for leading in list(_LEADING):
        leading.close()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_leaders)


@dataclass
class Request:
    """One step to run: the leader's own (``peer`` None) or a writer's."""

    step: str
    body: Any
    deadline: float
    peer: socket.socket | None = None
    # The writer's number for it, sent back with the answer.
    id: int = 0


class WriteGroup:
    """The writers of one SQLite database file on this machine."""

    def __init__(self, identity: tuple[int, int]) -> None:
        """The group of the file with this ``(st_dev, st_ino)``."""
        device, inode = identity
        self._name = f"\0dispatch-prefect-ledger/{PROTOCOL}/{device}/{inode}".encode()
        self._local = threading.local()

    @staticmethod
    def possible() -> bool:
        """Whether groups can form here (Linux's abstract socket names)."""
        return sys.platform.startswith("linux")

    def lead(self) -> Leadership | None:
        """Become the leader, or None when another writer leads now."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self._name)
        except OSError:
            listener.close()
            return None
        _LEADING.add(listener)
        listener.listen(128)
        listener.setblocking(False)

        return Leadership(listener)

    def connected(self) -> bool:
        """This thread kept a connection to a leader from its last request."""
        return (
            getattr(self._local, "connection", None) is not None
            and self._local.pid == os.getpid()
        )

    def ask(self, request: Request) -> dict[str, Any] | None:
        """Send ``request`` to the leader and return its answer.

        Each thread keeps its connection to the leader for its next
        request; a leader that stops leading closes them all.

        Returns None when no leader took the request: there was none, or it
        stopped leading before answering. The caller runs the step again.

        Raises:
            TimeoutError: no answer came by the deadline and the grace after
                it; the step may or may not have been committed.
        """
        self._local.sent = getattr(self._local, "sent", 0) + 1
        message = {
            "id": self._local.sent,
            "step": request.step,
            "body": request.body,
            "deadline": request.deadline,
        }
        connection = self._local.connection if self.connected() else self._connect()
        if connection is None:
            return None
        try:
            connection.settimeout(
                max(request.deadline - time.monotonic(), 0.0) + ANSWER_GRACE_S
            )
            connection.sendall(_frame(message))
            frame = _read_frame(connection)
        except TimeoutError:
            self._hang_up(connection)
            raise
        except OSError:
            frame = None
        except BaseException:
            # Interrupted: the answer must not be read as the next one's.
            self._hang_up(connection)
            raise
        try:
            answer = None if frame is None else json.loads(frame)
        except ValueError:
            answer = None
        if not isinstance(answer, dict) or answer.get("id") != message["id"]:
            self._hang_up(connection)
            return None

        return answer

    def _connect(self) -> socket.socket | None:
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            connection.connect(self._name)
        except OSError:
            connection.close()
            return None
        self._local.connection = connection
        self._local.pid = os.getpid()

        return connection

    def _hang_up(self, connection: socket.socket) -> None:
        connection.close()
        self._local.connection = None


class Leadership:
    """The listening socket of the leader and the writers it has accepted."""

    def __init__(self, listener: socket.socket) -> None:
        self._listener = listener
        # Writers connected and waiting for their next request or answer.
        self._connected: list[socket.socket] = []
        # Writers whose request is being run: they are answered next.
        self._busy: list[socket.socket] = []

    def __enter__(self) -> Leadership:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop leading. Writers not answered see their connection close."""
        self._listener.close()
        for connection in self._connected + self._busy:
            connection.close()
        self._connected, self._busy = [], []

    def collect(self) -> list[Request]:
        """The requests writers have sent by now, one from each at most."""
        ready = _readable([self._listener, *self._connected])
        if self._listener in ready:
            # Writers accepted just now may have sent already.
            fresh = self._accept()
            ready = [peer for peer in ready if peer is not self._listener]
            ready += _readable(fresh)
        requests = []
        for peer in ready:
            self._connected.remove(peer)
            request = _read_request(peer)
            if request is None:
                peer.close()
            else:
                self._busy.append(peer)
                requests.append(request)

        return requests

    def answer(self, request: Request, answer: dict[str, Any]) -> None:
        """Send ``answer`` to the writer of ``request``."""
        peer = request.peer
        if peer is None:
            return
        self._busy.remove(peer)
        try:
            peer.sendall(_frame({**answer, "id": request.id}))
        except OSError:
            peer.close()  # that writer is gone; it runs its step again if it can
        else:
            self._connected.append(peer)

    def _accept(self) -> list[socket.socket]:
        """Take every writer waiting to connect; the ones taken."""
        fresh: list[socket.socket] = []
        while True:
            try:
                peer, _address = self._listener.accept()
            except BlockingIOError:
                return fresh
            credentials = peer.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDENTIALS.size
            )
            _pid, uid, _gid = _CREDENTIALS.unpack(credentials)
            if uid != os.getuid():
                peer.close()
                continue
            peer.settimeout(_READ_TIMEOUT_S)
            _LEADING.add(peer)
            self._connected.append(peer)
            fresh.append(peer)


def _readable(sockets: list[socket.socket]) -> list[socket.socket]:
    """Those of ``sockets`` with something to read (or closed) now."""
    if not sockets:
        return []
    poller = select.poll()
    by_fd = {}
    for item in sockets:
        by_fd[item.fileno()] = item
        poller.register(item, select.POLLIN)

    return [by_fd[fd] for fd, _event in poller.poll(0)]


def _read_request(peer: socket.socket) -> Request | None:
    try:
        frame = _read_frame(peer)
        if frame is None:
            return None
        message = json.loads(frame)
        return Request(
            step=str(message["step"]),
            body=message["body"],
            deadline=float(message["deadline"]),
            peer=peer,
            id=int(message["id"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _frame(message: Any) -> bytes:
    payload = json.dumps(message, separators=(",", ":")).encode()

    return _HEADER.pack(len(payload)) + payload


def _read_frame(connection: socket.socket) -> bytes | None:
    """One length-prefixed message; None when the other side hung up."""
    header = _read_exactly(connection, _HEADER.size)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    if size > _MAX_FRAME:
        return None

    return _read_exactly(connection, size)


def _read_exactly(connection: socket.socket, size: int) -> bytes | None:
    buffer = bytearray()
    while len(buffer) < size:
        chunk = connection.recv(size - len(buffer))
        if not chunk:
            return None
        buffer += chunk

    return bytes(buffer)
