"""
The control channel: ``mailrelay queue ...`` talking to the running daemon.

The spool is owned by one process (it holds an exclusive lock on it), so
the queue tools cannot read or change it themselves; they ask the daemon
over Twisted AMP on a UNIX socket, ``<data_dir>/control.sock``, mode 0600:
only the relay's own user (and root) can connect, and a UNIX socket is
never reachable from the network.  The socket comes with a PID lock file
(``control.sock.lock``), so a socket left behind by a ``kill -9`` is
cleaned up by the next start instead of blocking it.

AMP limits one value to 64 KiB, and a list of a hundred thousand queued
messages is larger; every command therefore answers with the first chunk
of a JSON document, a token and the number of chunks, and ``FetchChunk``
returns the others.  The operations themselves live in ``QueueControl``,
which knows nothing of AMP, so they are tested directly.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import stat
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint, UNIXServerEndpoint, connectProtocol
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IListeningPort, IReactorTime, IReactorUNIX
from twisted.internet.protocol import Factory
from twisted.protocols import amp

from mailrelay.queue.manager import QueueManager
from mailrelay.spool.model import SpooledMessage, Status, UnknownMessage

SOCKET_NAME = "control.sock"
CHUNK = 60_000
STATES = ("active", "incoming", "deferred", "held")

# ---------------------------------------------------------------------------
# Errors and commands (shared by the daemon and the command line)
# ---------------------------------------------------------------------------


class ControlError(Exception):
    """The daemon refused a request; ``str()`` is the sentence for the operator."""


class UnknownMessageError(ControlError):
    """No live message has this queue id."""


class ControlUnavailable(Exception):
    """No daemon answers on the control socket."""


class _Command(amp.Command):
    response = [(b"result", amp.String()), (b"token", amp.Unicode()), (b"chunks", amp.Integer())]
    errors = {UnknownMessageError: b"UNKNOWN_MESSAGE", ControlError: b"CONTROL_ERROR"}
    requiresAnswer = True


class ListMessages(_Command):
    arguments = [
        (b"account", amp.Integer(optional=True)),
        (b"destination", amp.Unicode(optional=True)),
        (b"state", amp.Unicode(optional=True)),
        (b"min_age", amp.Float(optional=True)),
        (b"max_age", amp.Float(optional=True)),
        (b"limit", amp.Integer(optional=True)),
    ]


class ShowMessage(_Command):
    arguments = [(b"queue_id", amp.Unicode())]


class ExplainMessage(_Command):
    arguments = [(b"queue_id", amp.Unicode())]


_BULK = [
    (b"queue_ids", amp.ListOf(amp.Unicode())),
    (b"all", amp.Boolean()),
    (b"destination", amp.Unicode(optional=True)),
    (b"dry_run", amp.Boolean()),
]


class RetryMessages(_Command):
    arguments = list(_BULK)


class HoldMessages(_Command):
    arguments = list(_BULK)


class ReleaseMessages(_Command):
    arguments = list(_BULK)


class DeleteMessages(_Command):
    arguments = [*_BULK, (b"silent", amp.Boolean())]


class FetchChunk(amp.Command):
    arguments = [(b"token", amp.Unicode()), (b"index", amp.Integer())]
    response = [(b"result", amp.String())]
    errors = {ControlError: b"CONTROL_ERROR"}


COMMANDS: dict[str, type[_Command]] = {
    "list": ListMessages,
    "show": ShowMessage,
    "explain": ExplainMessage,
    "retry": RetryMessages,
    "hold": HoldMessages,
    "release": ReleaseMessages,
    "delete": DeleteMessages,
}

# ---------------------------------------------------------------------------
# The operations
# ---------------------------------------------------------------------------


def _when(ts: float | None) -> str | None:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts)) if ts is not None else None


class QueueControl:
    """What the queue tools may ask of a running queue manager."""

    def __init__(self, manager: QueueManager, clock: IReactorTime) -> None:
        self.manager = manager
        self.clock = clock

    @property
    def spool(self) -> Any:
        return self.manager.spool

    def _message(self, queue_id: str) -> SpooledMessage:
        message = self.spool.get(queue_id.strip().upper())
        if message is None:
            raise UnknownMessageError(f"no message {queue_id} in the queue")
        return message

    def state_of(self, message: SpooledMessage) -> str:
        if message.held:
            return "held"
        state = self.manager.entry_state(message.queue_id)
        if state == "active":
            return "active"
        return "deferred" if any(s.attempts for s in message.states) else "incoming"

    def _destinations(self, message: SpooledMessage) -> list[str]:
        return sorted({self.manager.destination_of(r) for r in message.pending_recipients})

    def _next_attempt(self, message: SpooledMessage) -> float | None:
        due = self.manager.due_time(message.queue_id)
        if due is not None:
            return due
        times = [s.next_attempt for s in message.states if not s.is_final and s.next_attempt is not None]
        return min(times) if times else None

    def summary(self, message: SpooledMessage) -> dict[str, Any]:
        env = message.envelope
        now = self.clock.seconds()
        pending = [(r, s) for r, s in zip(message.recipients, message.states, strict=True) if not s.is_final]
        replies = [s.last_reply for _, s in pending if s.last_reply]
        return {
            "queue_id": message.queue_id,
            "state": self.state_of(message),
            "route": env.get("route", "deliver"),
            "dsn": bool(env.get("dsn")),
            "created": message.created,
            "age": round(now - message.created, 3),
            "size": message.size,
            "sender": env.get("mail_from", ""),
            "from": env.get("from"),
            "account_id": env.get("account_id"),
            "account": env.get("account"),
            "recipients": len(message.recipients),
            "pending": len(pending),
            "attempts": max((s.attempts for _, s in pending), default=0),
            "destinations": self._destinations(message),
            "next_attempt": self._next_attempt(message),
            "last_reply": replies[0] if replies else None,
        }

    def _matches(
        self,
        message: SpooledMessage,
        account: int | None,
        destination: str | None,
        state: str | None,
        min_age: float | None,
        max_age: float | None,
        now: float,
    ) -> bool:
        if account is not None and message.envelope.get("account_id") != account:
            return False
        if destination is not None and destination.lower() not in self._destinations(message):
            return False
        if state is not None and self.state_of(message) != state:
            return False
        age = now - message.created
        if min_age is not None and age < min_age:
            return False
        return not (max_age is not None and age > max_age)

    def listing(
        self,
        account: int | None = None,
        destination: str | None = None,
        state: str | None = None,
        min_age: float | None = None,
        max_age: float | None = None,
        limit: int | None = 1000,
    ) -> dict[str, Any]:
        if state is not None and state not in STATES:
            raise ControlError(f"unknown state {state!r}: use one of {', '.join(STATES)}")
        now = self.clock.seconds()
        found = [
            m for m in self.spool.messages() if self._matches(m, account, destination, state, min_age, max_age, now)
        ]
        shown = found if not limit else found[:limit]
        return {
            "messages": [self.summary(m) for m in shown],
            "total": len(found),
            "queue": {
                "messages": self.manager.message_count,
                "active": self.manager.active_count,
                "deliveries": self.manager.running,
            },
        }

    def show(self, queue_id: str) -> dict[str, Any]:
        message = self._message(queue_id)
        env = message.envelope
        last = self.manager.last_results(message.queue_id)
        recipients = []
        for rcpt, s in zip(message.recipients, message.states, strict=True):
            seen = last.get(rcpt, {})
            recipients.append(
                {
                    "address": rcpt,
                    "status": s.status.name.lower(),
                    "attempts": s.attempts,
                    "next_attempt": s.next_attempt,
                    "last_reply": s.last_reply,
                    "destination": self.manager.destination_of(rcpt),
                    "role": (env.get("roles") or {}).get(rcpt, "to"),
                    "mx_host": seen.get("mx_host"),
                    "ip": seen.get("ip"),
                    "tls": seen.get("tls"),
                    "last_attempt": seen.get("at"),
                }
            )
        controls = env.get("controls") or {}
        return {
            **self.summary(message),
            "held": message.held,
            "envelope": {
                "mail_from": env.get("mail_from", ""),
                "from": env.get("from"),
                "subject": env.get("subject"),
                "message_id": env.get("message_id"),
                "account_id": env.get("account_id"),
                "account": env.get("account"),
                "client_ip": env.get("client_ip"),
                "listener": env.get("listener"),
                "received_at": env.get("received_at"),
                "tags": list(controls.get("tags") or ()),
                "campaign": controls.get("campaign"),
                "about": env.get("about"),
            },
            "recipients_detail": recipients,
            "expires": message.created + self.manager.settings.max_age,
        }

    def explain(self, queue_id: str) -> dict[str, Any]:
        """Why the message is still here, in sentences, with the facts behind them."""
        message = self._message(queue_id)
        now = self.clock.seconds()
        state = self.state_of(message)
        reasons: list[str] = []
        if state == "held":
            reasons.append(f"It is on hold: nothing is tried until `mailrelay queue release {message.queue_id}`.")
        elif state == "active":
            reasons.append("It is being delivered now (in the active window).")
        else:
            due = self._next_attempt(message)
            if due is None or due <= now:
                m = self.manager
                if m.active_count >= m.settings.active_window:
                    reasons.append(
                        f"It is due, and waits for room in the active window "
                        f"({m.active_count} of {m.settings.active_window} messages active)."
                    )
                else:
                    reasons.append("It is due and will be tried within a moment.")
            else:
                reasons.append(f"The next attempt is at {_when(due)} (in {due - now:.0f} s).")
        destinations = {}
        for key in self._destinations(message):
            d = self.manager.destination_state(key)
            if d is None:
                continue
            destinations[key] = d
            if d["dead"]:
                reasons.append(
                    f"The destination {key} is considered down until {_when(d['dead_until'])} after "
                    f"repeated connection failures (last: {d['last_failure']})."
                )
            elif d["queued"]:
                reasons.append(
                    f"The destination {key} has {d['queued']} delivery(ies) waiting for one of its "
                    f"{int(d['window'])} connection slot(s) ({d['active']} in use)."
                )
        for rcpt, s in zip(message.recipients, message.states, strict=True):
            if s.status is Status.DEFERRED:
                reasons.append(f"<{rcpt}> was deferred {s.attempts} time(s); last reply: {s.last_reply}.")
        expires = message.created + self.manager.settings.max_age
        reasons.append(f"Whatever is still undelivered at {_when(expires)} will be returned to the sender.")
        return {
            "queue_id": message.queue_id,
            "state": state,
            "reasons": reasons,
            "destinations": destinations,
            "next_attempt": self._next_attempt(message),
            "expires": expires,
        }

    def _select(
        self, queue_ids: Sequence[str], everything: bool, destination: str | None
    ) -> tuple[list[str], list[str]]:
        if not queue_ids and not everything and not destination:
            raise ControlError("name message ids, or use --all or --destination")
        if queue_ids:
            wanted = [q.strip().upper() for q in queue_ids]
            live = [q for q in wanted if self.spool.get(q) is not None]
            return live, [q for q in wanted if q not in live]
        messages = self.spool.messages()
        if destination:
            key = destination.lower()
            messages = [m for m in messages if key in self._destinations(m)]
        return [m.queue_id for m in messages], []

    async def retry(
        self, queue_ids: Sequence[str] = (), all: bool = False, destination: str | None = None, dry_run: bool = False
    ) -> dict[str, Any]:
        selected, missing = self._select(queue_ids, all, destination)
        done = []
        for qid in selected:
            message = self.spool.get(qid)
            if message is None or message.held:
                continue
            if dry_run or self.manager.retry(qid):
                done.append(qid)
        if destination and not dry_run:
            self.manager.revive(destination.lower())
        return {"action": "retry", "queue_ids": done, "missing": missing, "dry_run": dry_run}

    async def hold(
        self, queue_ids: Sequence[str] = (), all: bool = False, destination: str | None = None, dry_run: bool = False
    ) -> dict[str, Any]:
        return await self._set_held("hold", True, queue_ids, all, destination, dry_run)

    async def release(
        self, queue_ids: Sequence[str] = (), all: bool = False, destination: str | None = None, dry_run: bool = False
    ) -> dict[str, Any]:
        return await self._set_held("release", False, queue_ids, all, destination, dry_run)

    async def _set_held(
        self, action: str, held: bool, queue_ids: Sequence[str], all: bool, destination: str | None, dry_run: bool
    ) -> dict[str, Any]:
        """Hold or release the selected messages that are not already so."""
        selected, missing = self._select(queue_ids, all, destination)
        change = self.manager.hold if held else self.manager.release
        done = []
        for qid in selected:
            message = self.spool.get(qid)
            if message is None or message.held == held:
                continue
            if not dry_run:
                try:
                    await change(qid)
                except UnknownMessage:
                    continue
            done.append(qid)
        return {"action": action, "queue_ids": done, "missing": missing, "dry_run": dry_run}

    async def delete(
        self,
        queue_ids: Sequence[str] = (),
        all: bool = False,
        destination: str | None = None,
        dry_run: bool = False,
        silent: bool = False,
    ) -> dict[str, Any]:
        selected, missing = self._select(queue_ids, all, destination)
        done = []
        notices = {}
        for qid in selected:
            if dry_run:
                done.append(qid)
                continue
            try:
                notice = await self.manager.delete(qid, notify=not silent)
            except UnknownMessage:
                continue
            done.append(qid)
            if notice is not None:
                notices[qid] = notice
        return {
            "action": "delete",
            "queue_ids": done,
            "missing": missing,
            "dry_run": dry_run,
            "silent": silent,
            "notices": notices,
        }


# ---------------------------------------------------------------------------
# The AMP server
# ---------------------------------------------------------------------------


class _Chunks:
    """Answers too large for one AMP value, kept briefly for ``FetchChunk``."""

    def __init__(self, clock: IReactorTime, ttl: float = 60.0) -> None:
        self._clock = clock
        self._ttl = ttl
        self._held: dict[str, tuple[float, list[bytes]]] = {}

    def answer(self, result: Any) -> dict[str, Any]:
        data = json.dumps(result, sort_keys=True).encode("utf-8")
        parts = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)] or [b""]
        token = ""
        if len(parts) > 1:
            now = self._clock.seconds()
            self._held = {t: v for t, v in self._held.items() if v[0] > now}
            token = secrets.token_hex(8)
            self._held[token] = (now + self._ttl, parts)
        return {"result": parts[0], "token": token, "chunks": len(parts)}

    def fetch(self, token: str, index: int) -> bytes:
        held = self._held.get(token)
        if held is None or not 0 < index < len(held[1]):
            raise ControlError("no such answer (expired?)")
        if index == len(held[1]) - 1:
            del self._held[token]
        return held[1][index]


class ControlProtocol(amp.AMP):
    """One connection of a queue tool."""

    def __init__(self, control: QueueControl, chunks: _Chunks) -> None:
        super().__init__()
        self.control = control
        self.chunks = chunks

    @ListMessages.responder
    def list_messages(
        self,
        account: int | None = None,
        destination: str | None = None,
        state: str | None = None,
        min_age: float | None = None,
        max_age: float | None = None,
        limit: int | None = None,
    ) -> dict[str, Any]:
        return self.chunks.answer(self.control.listing(account, destination, state, min_age, max_age, limit))

    @ShowMessage.responder
    def show_message(self, queue_id: str) -> dict[str, Any]:
        return self.chunks.answer(self.control.show(queue_id))

    @ExplainMessage.responder
    def explain_message(self, queue_id: str) -> dict[str, Any]:
        return self.chunks.answer(self.control.explain(queue_id))

    def _bulk(self, op: Any, **kwargs: Any) -> Deferred[dict[str, Any]]:
        return Deferred.fromCoroutine(op(**kwargs)).addCallback(self.chunks.answer)

    @RetryMessages.responder
    def retry_messages(
        self, queue_ids: list[str], all: bool, dry_run: bool, destination: str | None = None
    ) -> Deferred[dict[str, Any]]:
        return self._bulk(self.control.retry, queue_ids=queue_ids, all=all, destination=destination, dry_run=dry_run)

    @HoldMessages.responder
    def hold_messages(
        self, queue_ids: list[str], all: bool, dry_run: bool, destination: str | None = None
    ) -> Deferred[dict[str, Any]]:
        return self._bulk(self.control.hold, queue_ids=queue_ids, all=all, destination=destination, dry_run=dry_run)

    @ReleaseMessages.responder
    def release_messages(
        self, queue_ids: list[str], all: bool, dry_run: bool, destination: str | None = None
    ) -> Deferred[dict[str, Any]]:
        return self._bulk(self.control.release, queue_ids=queue_ids, all=all, destination=destination, dry_run=dry_run)

    @DeleteMessages.responder
    def delete_messages(
        self, queue_ids: list[str], all: bool, dry_run: bool, silent: bool, destination: str | None = None
    ) -> Deferred[dict[str, Any]]:
        return self._bulk(
            self.control.delete, queue_ids=queue_ids, all=all, destination=destination, dry_run=dry_run, silent=silent
        )

    @FetchChunk.responder
    def fetch_chunk(self, token: str, index: int) -> dict[str, Any]:
        return {"result": self.chunks.fetch(token, index)}


class ControlFactory(Factory):
    def __init__(self, control: QueueControl) -> None:
        self.control = control
        self.chunks = _Chunks(control.clock)

    def buildProtocol(self, addr: Any) -> ControlProtocol:
        protocol = ControlProtocol(self.control, self.chunks)
        protocol.factory = self
        return protocol


def socket_path(data_dir: Path) -> Path:
    return data_dir / SOCKET_NAME


def _clear_stale(path: Path) -> None:
    """Remove a socket file nobody listens on (left by a killed daemon); a live one stays and listening fails."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return
    except FileNotFoundError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
    except OSError:
        pass
    finally:
        probe.close()


async def listen(reactor: IReactorUNIX, path: Path, control: QueueControl) -> IListeningPort:
    """Serve ``control`` on the UNIX socket ``path`` (mode 0600; a stale socket is replaced)."""
    _clear_stale(path)
    endpoint = UNIXServerEndpoint(reactor, str(path), mode=0o600, wantPID=True)
    port: IListeningPort = await endpoint.listen(ControlFactory(control))
    os.chmod(path, 0o600)
    return port


# ---------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------


def not_running(path: Path, why: str = "") -> ControlUnavailable:
    detail = f"no control socket at {path}" if not why else f"the control socket at {path} {why}"
    return ControlUnavailable(f"mailrelay is not running ({detail})")


async def call(reactor: Any, path: Path, verb: str, timeout: float = 120.0, **arguments: Any) -> Any:
    """
    Run one queue command on the daemon listening at ``path`` and return its
    decoded JSON answer.  Raises ``ControlUnavailable`` when no daemon
    answers, ``ControlError`` (or ``UnknownMessageError``) when it refuses.
    """
    if not path.exists():
        raise not_running(path)
    endpoint = UNIXClientEndpoint(reactor, str(path), timeout=10)
    try:
        protocol = await connectProtocol(endpoint, amp.AMP())
    except ConnectError as e:
        raise not_running(path, f"does not answer ({e.osError if hasattr(e, 'osError') else e})")
    except OSError as e:
        raise not_running(path, f"cannot be used ({e.strerror or e})")
    try:
        command = COMMANDS[verb]
        args = {k: v for k, v in arguments.items() if v is not None}
        answer = await protocol.callRemote(command, **args).addTimeout(timeout, reactor)
        parts = [answer["result"]]
        for index in range(1, answer["chunks"]):
            more = await protocol.callRemote(FetchChunk, token=answer["token"], index=index).addTimeout(
                timeout, reactor
            )
            parts.append(more["result"])
        return json.loads(b"".join(parts))
    finally:
        protocol.transport.loseConnection()
