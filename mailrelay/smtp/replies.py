"""
Every reply the SMTP server sends, named.

Naming them keeps the texts consistent, lets tests compare against the same
constant the protocol uses, and keeps free-form strings out of the protocol.
Enhanced status codes follow RFC 3463 / RFC 5248; the greeting, the EHLO/HELO
answers and the ``334``/``354`` intermediate replies carry none (RFC 2034).
"""

from __future__ import annotations

from collections.abc import Iterable

from mailrelay.types import Reply

# --- connection --------------------------------------------------------------


def service_ready(hostname: str) -> Reply:
    """The greeting.  No version number: it only helps attackers."""
    return Reply(220, "", f"{hostname} ESMTP mailrelay ready")


def ehlo(hostname: str, keywords: Iterable[str]) -> Reply:
    """
    The multi-line EHLO answer: our name, then one extension per line.

    The client's own name is not echoed back, so nothing it sends can end up
    in our reply.
    """
    return Reply(250, "", (hostname, *keywords))


def helo(hostname: str) -> Reply:
    """The HELO answer: RFC 821 clients get our name and no extensions."""
    return Reply(250, "", hostname)


CLOSING = Reply(221, "2.0.0", "Goodbye, closing connection")
TIMEOUT = Reply(421, "4.4.2", "Timeout exceeded, closing connection")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, please try again later")
TOO_MANY_CONNECTIONS_FROM_ADDRESS = Reply(
    421, "4.7.0", "Too many connections from your address, please try again later"
)
NOT_SMTP = Reply(421, "4.7.0", "This is an SMTP server and does not speak HTTP, closing connection")
SERVICE_UNAVAILABLE = Reply(421, "4.3.0", "Service temporarily unavailable, closing connection")

# --- generic command replies ---------------------------------------------------

OK = Reply(250, "2.0.0", "OK")
RESET_OK = Reply(250, "2.0.0", "Transaction reset")
HELP = Reply(
    214,
    "2.0.0",
    "Supported commands: EHLO HELO STARTTLS AUTH MAIL RCPT DATA RSET NOOP VRFY HELP QUIT",
)
CANNOT_VRFY = Reply(252, "2.5.0", "Cannot verify the address, but will accept a message for it and attempt delivery")
EXPN_NOT_AVAILABLE = Reply(502, "5.5.1", "EXPN is not available")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
UNKNOWN_COMMAND = Reply(500, "5.5.1", "Command not recognized")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
INVALID_UTF8 = Reply(500, "5.5.2", "The command contains bytes that are not valid UTF-8")
INTERNAL_ERROR = Reply(451, "4.3.0", "Internal error, please try again later")

# --- sequence and syntax ------------------------------------------------------

SEND_HELO_FIRST = Reply(503, "5.5.1", "Send EHLO or HELO first")
SEND_EHLO_FIRST = Reply(503, "5.5.1", "Send EHLO first: AUTH is an ESMTP extension")
NESTED_MAIL = Reply(503, "5.5.1", "Sender already given; send RSET to start a new transaction")
NEED_MAIL = Reply(503, "5.5.1", "Send MAIL FROM first")
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients")
HELO_SYNTAX = Reply(501, "5.5.4", "EHLO and HELO need a domain name or address literal")
MAIL_SYNTAX = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address> [parameters]")
RCPT_SYNTAX = Reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
VRFY_SYNTAX = Reply(501, "5.5.4", "Syntax: VRFY <address>")
NO_ARGUMENTS = Reply(501, "5.5.4", "This command takes no arguments")
PARAMETER_SYNTAX = Reply(501, "5.5.4", "Syntax error in a MAIL parameter")
BAD_SENDER_SYNTAX = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT_SYNTAX = Reply(501, "5.1.3", "Bad recipient address syntax")
NON_ASCII_ADDRESS = Reply(553, "5.6.7", "The address contains non-ASCII characters; send MAIL FROM with SMTPUTF8 first")
UNKNOWN_PARAMETER = Reply(555, "5.5.4", "Unsupported MAIL or RCPT parameter")

# --- envelope and message -----------------------------------------------------

SENDER_OK = Reply(250, "2.1.0", "Sender accepted")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient accepted")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
START_MAIL_INPUT = Reply(354, "", "Start mail input; end with <CRLF>.<CRLF>")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds the maximum message size")
DATA_LINE_TOO_LONG = Reply(554, "5.6.0", "Message rejected: a line is longer than 998 characters")
SMUGGLING = Reply(
    554,
    "5.6.0",
    "Message rejected: a bare CR or LF next to a line holding only a dot (possible SMTP smuggling)",
)
QUEUE_TIMEOUT = Reply(451, "4.4.2", "Timed out while storing the message; it was not accepted, please try again later")

# --- STARTTLS -----------------------------------------------------------------

READY_FOR_TLS = Reply(220, "2.0.0", "Ready to start TLS")
TLS_ALREADY_ACTIVE = Reply(503, "5.5.1", "TLS is already active")
TLS_NOT_AVAILABLE = Reply(502, "5.5.1", "STARTTLS is not available on this server")

# --- AUTH ---------------------------------------------------------------------

AUTH_CONTINUE = Reply(334, "", "")
AUTH_USERNAME_PROMPT = Reply(334, "", "VXNlcm5hbWU6")  # base64 of "Username:"
AUTH_PASSWORD_PROMPT = Reply(334, "", "UGFzc3dvcmQ6")  # base64 of "Password:"
AUTH_SUCCESSFUL = Reply(235, "2.7.0", "Authentication successful")
AUTH_INVALID = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTHZID_REFUSED = Reply(
    535, "5.7.8", "Authentication credentials invalid: the authorization identity must match the username"
)
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
ENCRYPTION_REQUIRED = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
AUTH_CANCELLED = Reply(501, "5.0.0", "Authentication cancelled")
AUTH_BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode the response: it is not valid base64")
AUTH_MALFORMED = Reply(501, "5.5.2", "Malformed authentication response")
AUTH_SYNTAX = Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
AUTH_MECHANISM_UNKNOWN = Reply(504, "5.5.4", "Unrecognized authentication mechanism; use PLAIN or LOGIN")
ALREADY_AUTHENTICATED = Reply(503, "5.5.1", "Already authenticated")
AUTH_IN_TRANSACTION = Reply(503, "5.5.1", "AUTH is not allowed during a mail transaction")
