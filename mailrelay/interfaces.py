"""
The seams between the stages (SMTP session -> policy -> spool -> queue ->
delivery -> events).

Each stage depends on the interfaces of the stages to its right, never on
their classes, so a test can stand an in-memory fake in the seam (checked
with ``zope.interface.verify.verifyObject``).
"""

from __future__ import annotations

from zope.interface import Attribute, Interface

# ---------------------------------------------------------------------------
# SMTP server protocol -> its decisions.  Owned by mailrelay/smtp.
# ---------------------------------------------------------------------------


class ISMTPDelegate(Interface):
    """
    The decisions of one SMTP connection.  The server protocol only speaks
    SMTP; everything it has to decide it asks here.

    Every method may return a value or a Deferred.  To refuse, raise (or
    errback with) ``mailrelay.types.SMTPReplyError``; its ``close`` flag asks
    the protocol to close the connection after the reply.  Any other
    exception is logged and answered with ``451 4.3.0``.
    """

    def connection_made(session):
        """
        A client connected (``session`` is a ``SessionInfo``).  Raise
        ``SMTPReplyError(close=True)`` to refuse it (``421`` connection limits).
        """

    def connection_lost(session):
        """The connection ended, whatever the reason."""

    def authenticate(session, mechanism, username, password):
        """
        Check credentials given with AUTH ``mechanism`` (``"PLAIN"`` or
        ``"LOGIN"``); ``username`` and ``password`` are ``str``.

        Returns (a Deferred of) a ``Principal``.  Wrong credentials raise
        ``twisted.cred.error.UnauthorizedLogin`` (the protocol answers
        ``535 5.7.8``); ``SMTPReplyError`` for anything else (``421 4.7.0``
        after too many failures).
        """

    def validate_from(session, address, params):
        """``MAIL FROM:<address>`` with ``MailParams``; returns None."""

    def validate_to(session, envelope, address):
        """
        ``RCPT TO:<address>`` within ``envelope`` (the recipients accepted
        so far); returns None.
        """

    def open_message(session, envelope):
        """
        ``DATA`` was accepted for ``envelope``: return an
        ``IMessageReceiver`` that takes the message as it arrives.  Raise
        ``SMTPReplyError`` to refuse DATA (``451 4.3.1 Queue full``).
        """


class IMessageReceiver(Interface):
    """
    Takes one message while it arrives.  The protocol has already removed
    dot-stuffing and the final ``.`` line; lines end in CRLF as received.
    """

    def write(data):
        """Some more bytes of the message (any chunking)."""

    def finish():
        """
        The whole message has arrived.  Returns a Deferred that fires with
        the final ``Reply`` (``250 2.0.0 Ok: queued as ...``) only once the
        message is durable, or fails with ``SMTPReplyError``.
        """

    def abort():
        """The message will not be committed (too big, bad lines, lost connection)."""


# ---------------------------------------------------------------------------
# Spool: durable message storage.  Owned by mailrelay/spool.
# ---------------------------------------------------------------------------


class ISpoolWriter(Interface):
    """One message being written into the spool."""

    queue_id = Attribute("The queue id (str) the message will have once committed.")
    size = Attribute("Bytes written so far.")

    def write(data):
        """Append message bytes.  Never blocks the reactor for long."""

    def commit():
        """
        Make the message durable and visible in the queue.  The Deferred
        fires with the queue id only after the data, the envelope and the
        recipients' states are on disk (fsync); a crash before that leaves
        nothing visible.
        """

    def abort():
        """Throw the message away; nothing of it stays visible."""


class ISpool(Interface):
    """
    The durable queue of accepted messages with per-recipient state, so a
    restart never delivers a recipient twice nor loses one.
    """

    def open_message(envelope, recipients):
        """
        Start a message.  ``envelope`` is a JSON-serialisable dict (account,
        principal, client, mail_from, params, processing attributes);
        ``recipients`` a sequence of ``str``.  Returns an ``ISpoolWriter``.
        """

    def recover():
        """Once at start-up: Deferred[list[SpooledMessage]] of live messages, oldest first."""

    def subscribe(listener):
        """``listener(SpooledMessage)`` for each newly committed message, once durable."""

    def messages():
        """Live messages from memory (list[SpooledMessage]), oldest first."""

    def get(queue_id):
        """The live SpooledMessage or None."""

    def read_message(queue_id):
        """Deferred[bytes]: the whole body, CRC-checked (for small bodies)."""

    def open_body(queue_id):
        """A reader: ``.size``, ``.read(offset, length) -> Deferred[bytes]``, ``.close()``."""

    def record(queue_id, outcomes):
        """
        ``outcomes``: {recipient: RecipientState}; Deferred[None] once durable.
        A final state never changes; when all are final the message is finished.
        """

    def hold(queue_id):
        """Deferred[None]; held messages are not scheduled."""

    def release(queue_id):
        """Deferred[None]."""

    def delete(queue_id):
        """Deferred[None]; finishes the message without delivering."""

    def stats():
        """SpoolStats (walks the index: not for every command)."""

    def disk_free_fraction():
        """Free fraction of the spool's file system (mail is refused below 0.05)."""

    def close():
        """Deferred[None]: wait for pending syncs, close files, release the lock."""


# ---------------------------------------------------------------------------
# Credentials lookups used by the AUTH checkers.  Owned by mailrelay/storage.
# ---------------------------------------------------------------------------


class ICredentialStore(Interface):
    """Reads what the AUTH checkers need; every method returns a Deferred."""

    def account_login(name):
        """
        The account (or ``parent\\child`` sub-account) called ``name``:
        a ``mailrelay.storage.model.LoginRecord`` or None.
        """

    def token_login(kind, secret_hash):
        """
        The credential of ``kind`` (``"smtp_user"``, ``"api_token"`` or
        ``"api_key"``) whose stored SHA-256 hex digest is ``secret_hash``:
        a ``LoginRecord`` or None.
        """


# ---------------------------------------------------------------------------
# Events.  Owned by mailrelay/events.
# ---------------------------------------------------------------------------


class IEventSink(Interface):
    """Where every stage reports what happened; never blocks its caller."""

    def emit(event):
        """Record ``event`` (a ``mailrelay.events.model.Event``)."""
