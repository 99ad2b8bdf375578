"""
Tests for mailrelay.smtp.tls and for the SMTP protocol over real TLS in memory
(trustme certificates, iosim pumps; no sockets).
"""

from __future__ import annotations

import datetime
import os
import stat
from pathlib import Path
from typing import Any

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL, crypto
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from mailrelay.smtp import replies
from mailrelay.smtp.protocol import ServerSettings, SMTPServerFactory
from mailrelay.smtp.tls import (
    ReloadingContextFactory,
    TLSConfigError,
    ensure_self_signed,
    implicit_tls_factory,
    server_context_factory,
)
from mailrelay.tlslayer import DirectTLSProtocol, write_through
from tests.support.smtp_fakes import FakeDelegate, LineClient, connect_pair
from tests.support.tls_counting import CountingConnection

HOST = "mx.example.com"
ROOT = trustme.CA()
INTERMEDIATE = ROOT.create_child_ca()
LEAF = INTERMEDIATE.issue_cert(HOST)
OTHER_LEAF = INTERMEDIATE.issue_cert(HOST)


def write_pems(directory: str, leaf: trustme.LeafCert = LEAF) -> tuple[str, str]:
    """Write ``leaf``'s full chain and key; return (cert path, key path)."""
    os.makedirs(directory, exist_ok=True)
    cert_path = os.path.join(directory, "cert.pem")
    key_path = os.path.join(directory, "key.pem")
    Path(cert_path).write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    Path(key_path).write_bytes(leaf.private_key_pem.bytes())
    return cert_path, key_path


def verifying_client_context(max_version: int | None = None) -> SSL.Context:
    """A pyOpenSSL client context that trusts only the root CA and verifies the chain."""
    context = SSL.Context(SSL.TLS_METHOD)
    context.get_cert_store().add_cert(
        crypto.X509.from_cryptography(x509.load_pem_x509_certificate(ROOT.cert_pem.bytes()))
    )  # type: ignore[union-attr]
    context.set_verify(SSL.VERIFY_PEER, lambda conn, cert, errno, depth, ok: bool(ok))
    if max_version is not None:
        context.set_max_proto_version(max_version)
    return context


def tls11_client_context() -> SSL.Context:
    """A client that speaks TLS 1.1 only (security level 0 so OpenSSL 3 lets it)."""
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_1_VERSION)
    context.set_max_proto_version(SSL.TLS1_1_VERSION)
    context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
    return context


def handshake(server_context: SSL.Context, client_context: SSL.Context) -> tuple[SSL.Connection, SSL.Connection]:
    """Run a TLS handshake between two memory-BIO connections; SSL.Error if it fails."""
    server = SSL.Connection(server_context, None)
    server.set_accept_state()
    client = SSL.Connection(client_context, None)
    client.set_connect_state()
    client.set_tlsext_host_name(HOST.encode())
    done = {id(server): False, id(client): False}
    for _ in range(20):
        for conn in (client, server):
            if not done[id(conn)]:
                try:
                    conn.do_handshake()
                    done[id(conn)] = True
                except SSL.WantReadError:
                    pass
        for source, sink in ((client, server), (server, client)):
            try:
                data = source.bio_read(1 << 20)
            except SSL.WantReadError:
                continue
            sink.bio_write(data)
        if all(done.values()):
            return server, client
    raise AssertionError("handshake did not finish")


class ServerContextTests(SynchronousTestCase):
    """server_context_factory: chain, versions and errors."""

    def setUp(self) -> None:
        self.cert_path, self.key_path = write_pems(self.mktemp())

    def test_full_chain(self) -> None:
        """The intermediate is sent: a client trusting only the root verifies the leaf."""
        options = server_context_factory(self.cert_path, self.key_path)
        server, client = handshake(options.getContext(), verifying_client_context())
        chain = client.get_peer_cert_chain()
        assert chain is not None
        self.assertEqual(len(chain), 2)
        self.assertEqual(server.get_protocol_version_name(), "TLSv1.3")

    def test_tls12_accepted(self) -> None:
        """A TLS 1.2 client is served."""
        options = server_context_factory(self.cert_path, self.key_path)
        server, _ = handshake(options.getContext(), verifying_client_context(SSL.TLS1_2_VERSION))
        self.assertEqual(server.get_protocol_version_name(), "TLSv1.2")

    def test_tls11_refused(self) -> None:
        """A TLS 1.1 client is refused (and that client does work against a server that allows 1.1)."""
        permissive = SSL.Context(SSL.TLS_METHOD)
        permissive.set_min_proto_version(SSL.TLS1_1_VERSION)
        permissive.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        permissive.use_certificate_chain_file(self.cert_path)
        permissive.use_privatekey_file(self.key_path)
        server, _ = handshake(permissive, tls11_client_context())
        self.assertEqual(server.get_protocol_version_name(), "TLSv1.1")

        options = server_context_factory(self.cert_path, self.key_path)
        self.assertRaises(SSL.Error, handshake, options.getContext(), tls11_client_context())

    def test_missing_file(self) -> None:
        """A missing file is named in the error."""
        e = self.assertRaises(TLSConfigError, server_context_factory, self.cert_path + ".nope", self.key_path)
        self.assertIn("cert.pem.nope", str(e))
        self.assertIn("does not exist", str(e))
        e = self.assertRaises(TLSConfigError, server_context_factory, self.cert_path, self.key_path + ".nope")
        self.assertIn("private key", str(e))

    def test_not_pem(self) -> None:
        """Files that are not PEM say so."""
        Path(self.cert_path).write_bytes(b"hello")
        e = self.assertRaises(TLSConfigError, server_context_factory, self.cert_path, self.key_path)
        self.assertIn("no PEM certificate", str(e))
        cert_path, key_path = write_pems(self.mktemp())
        Path(key_path).write_bytes(b"-----BEGIN PRIVATE KEY-----\nnonsense\n-----END PRIVATE KEY-----\n")
        e = self.assertRaises(TLSConfigError, server_context_factory, cert_path, key_path)
        self.assertIn("no PEM private key", str(e))

    def test_encrypted_key(self) -> None:
        """An encrypted key is refused with a clear message."""
        key = ec.generate_private_key(ec.SECP256R1())
        Path(self.key_path).write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"pw"),
            )
        )
        e = self.assertRaises(TLSConfigError, server_context_factory, self.cert_path, self.key_path)
        self.assertIn("encrypted", str(e))

    def test_key_mismatch(self) -> None:
        """A key that is not the leaf certificate's is refused."""
        Path(self.key_path).write_bytes(OTHER_LEAF.private_key_pem.bytes())
        e = self.assertRaises(TLSConfigError, server_context_factory, self.cert_path, self.key_path)
        self.assertIn("does not match", str(e))


def peer_serial(context_factory: Any) -> int:
    _, client = handshake(context_factory.getContext(), verifying_client_context())
    cert = client.get_peer_certificate()
    assert cert is not None
    return cert.to_cryptography().serial_number


class ReloadingContextFactoryTests(SynchronousTestCase):
    """Certificate reloading."""

    def test_reload(self) -> None:
        """reload() serves the new certificate; a broken file keeps the old one."""
        directory = self.mktemp()
        cert_path, key_path = write_pems(directory)
        factory = ReloadingContextFactory(cert_path, key_path)
        first = peer_serial(factory)
        write_pems(directory, OTHER_LEAF)
        self.assertEqual(peer_serial(factory), first)
        factory.reload()
        second = peer_serial(factory)
        self.assertNotEqual(second, first)
        Path(key_path).write_bytes(LEAF.private_key_pem.bytes())  # no longer matches
        self.assertRaises(TLSConfigError, factory.reload)
        self.assertEqual(peer_serial(factory), second)


    def test_reload_if_changed(self) -> None:
        """
        A renewal (new files renamed into place) is picked up once; an
        unusable change raises once and keeps the certificate until the
        next change.
        """
        directory = self.mktemp()
        cert_path, key_path = write_pems(directory)
        factory = ReloadingContextFactory(cert_path, key_path)
        first = peer_serial(factory)
        self.assertFalse(factory.reload_if_changed())
        replace_pems(directory, OTHER_LEAF)
        self.assertTrue(factory.reload_if_changed())
        second = peer_serial(factory)
        self.assertNotEqual(second, first)
        self.assertFalse(factory.reload_if_changed())
        replace_file(key_path, LEAF.private_key_pem.bytes())  # the key of the other certificate
        self.assertRaises(TLSConfigError, factory.reload_if_changed)
        self.assertFalse(factory.reload_if_changed())  # not tried (nor logged) again until the next change
        self.assertEqual(peer_serial(factory), second)
        replace_pems(directory, LEAF)
        self.assertTrue(factory.reload_if_changed())
        self.assertEqual(peer_serial(factory), first)

    def test_missing_files(self) -> None:
        """Files that are gone for a moment (mid-renewal) are no change."""
        directory = self.mktemp()
        cert_path, key_path = write_pems(directory)
        factory = ReloadingContextFactory(cert_path, key_path)
        os.unlink(cert_path)
        self.assertFalse(factory.reload_if_changed())


def replace_file(path: str, data: bytes) -> None:
    """Write ``data`` beside ``path`` and rename it into place, as renewal tools do."""
    Path(path + ".new").write_bytes(data)
    os.replace(path + ".new", path)


def replace_pems(directory: str, leaf: trustme.LeafCert) -> None:
    replace_file(os.path.join(directory, "cert.pem"), b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    replace_file(os.path.join(directory, "key.pem"), leaf.private_key_pem.bytes())


class SelfSignedTests(SynchronousTestCase):
    """ensure_self_signed."""

    def test_creates_once(self) -> None:
        """First call creates a usable certificate and a 0600 key; the second changes nothing."""
        directory = self.mktemp()
        cert_path = os.path.join(directory, "tls", "cert.pem")
        key_path = os.path.join(directory, "tls", "key.pem")
        clock = Clock()
        clock.advance(1_700_000_000)
        self.assertTrue(ensure_self_signed(cert_path, key_path, HOST, clock=clock))
        self.assertEqual(stat.S_IMODE(os.stat(key_path).st_mode), 0o600)
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
        self.assertEqual(
            cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
                x509.DNSName
            ),
            [HOST],
        )
        self.assertEqual(
            cert.not_valid_before_utc,
            datetime.datetime.fromtimestamp(1_700_000_000, tz=datetime.UTC) - datetime.timedelta(days=1),
        )
        server_context_factory(cert_path, key_path)  # the key matches
        before = Path(cert_path).read_bytes()
        self.assertFalse(ensure_self_signed(cert_path, key_path, HOST))
        self.assertEqual(Path(cert_path).read_bytes(), before)

    def test_ip_hostname(self) -> None:
        """An IP address as host name goes into an IP SAN."""
        directory = self.mktemp()
        cert_path, key_path = os.path.join(directory, "c.pem"), os.path.join(directory, "k.pem")
        ensure_self_signed(cert_path, key_path, "192.0.2.1")
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual([str(ip) for ip in names.get_values_for_type(x509.IPAddress)], ["192.0.2.1"])

    def test_half_present(self) -> None:
        """If only one file exists, nothing is overwritten and the error says which."""
        directory = self.mktemp()
        os.makedirs(directory)
        cert_path, key_path = os.path.join(directory, "c.pem"), os.path.join(directory, "k.pem")
        Path(key_path).write_bytes(b"precious")
        e = self.assertRaises(TLSConfigError, ensure_self_signed, cert_path, key_path, HOST)
        self.assertIn("k.pem", str(e))
        self.assertEqual(Path(key_path).read_bytes(), b"precious")
        self.assertFalse(os.path.exists(cert_path))


def client_options() -> Any:
    return optionsForClientTLS(HOST, trustRoot=Certificate.loadPEM(ROOT.cert_pem.bytes()))


class StartTLSTests(SynchronousTestCase):
    """STARTTLS then AUTH with real TLS over iosim."""

    def setUp(self) -> None:
        cert_path, key_path = write_pems(self.mktemp())
        self.clock = Clock()
        self.delegate = FakeDelegate()
        self.factory = SMTPServerFactory(
            ServerSettings(hostname=HOST, listener="submission"),
            lambda: self.delegate,
            self.clock,
            ReloadingContextFactory(cert_path, key_path),
        )
        self.server = self.factory.buildProtocol(None)
        self.client = LineClient()
        self.pump = connect_pair(self.server, self.client, self.clock)

    def say(self, *lines: bytes) -> list[str]:
        for line in lines:
            self.client.send(line)
        self.pump.flush()
        return self.client.take()

    def test_starttls_then_auth(self) -> None:
        """EHLO, STARTTLS, handshake, EHLO offers AUTH, AUTH PLAIN and a message; the session knows the TLS."""
        self.assertEqual(self.client.take(), ["220 mx.example.com ESMTP mailrelay ready"])
        ehlo = self.say(b"EHLO client.example.org")
        self.assertEqual(ehlo[-1], "250 STARTTLS")
        self.assertNotIn("AUTH PLAIN LOGIN", " ".join(ehlo))
        self.assertEqual(self.say(b"AUTH PLAIN AGFsaWNlAHNlY3JldA=="), [str(replies.ENCRYPTION_REQUIRED)])
        self.assertEqual(self.say(b"STARTTLS"), ["220 2.0.0 Ready to start TLS"])
        self.client.transport.startTLS(client_options())  # type: ignore[union-attr]
        self.pump.flush()
        ehlo = self.say(b"EHLO client.example.org")
        self.assertEqual(ehlo[-1], "250 AUTH PLAIN LOGIN")
        self.assertNotIn("250-STARTTLS", ehlo)
        self.assertEqual(self.say(b"AUTH PLAIN AGFsaWNlAHNlY3JldA=="), [str(replies.AUTH_SUCCESSFUL)])
        codes = self.say(
            b"MAIL FROM:<alice@example.com>",
            b"RCPT TO:<bob@example.net>",
            b"DATA",
            b"Subject: over TLS\r\n\r\nhello\r\n.",
            b"QUIT",
        )
        self.assertEqual([line[:3] for line in codes], ["250", "250", "354", "250", "221"])
        self.assertEqual(self.delegate.receivers[0].data, b"Subject: over TLS\r\n\r\nhello\r\n")
        session = next(c for c in self.delegate.calls if c[0] == "validate_from")[1]
        self.assertTrue(session.tls)
        self.assertEqual(session.tls_version, "TLSv1.3")
        self.assertTrue(session.tls_cipher)
        self.assertEqual(session.principal.account_name, "alice")
        self.assertEqual(session.client_ip, "198.51.100.9")
        self.assertTrue(self.client.lost)
        self.assertEqual(self.delegate.names()[-1], "connection_lost")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_replies_written_at_once(self) -> None:
        """
        After STARTTLS a reply is encrypted and handed to the socket when the
        server writes it, without Twisted's hold-for-one-turn batching (the
        server batches its replies itself).
        """
        self.client.take()
        self.say(b"EHLO client.example.org")
        self.say(b"STARTTLS")
        self.client.transport.startTLS(client_options())  # type: ignore[union-attr]
        self.pump.flush()
        transport = self.server.transport
        layer = transport.protocol
        self.assertIsInstance(layer, TLSMemoryBIOProtocol)
        timers = self.clock.getDelayedCalls()
        sent = len(transport.stream)
        self.server._reply(replies.OK)
        self.server._flush()
        self.assertGreater(len(transport.stream), sent)
        self.assertEqual(self.clock.getDelayedCalls(), timers)
        self.assertEqual(self.say(b"NOOP"), [str(replies.OK), str(replies.OK)])

    def test_reads_without_exceptions(self) -> None:
        """After STARTTLS the layer reads as ``tlslayer.receive`` does: no WantReadError per command."""
        self.client.take()
        self.say(b"EHLO client.example.org")
        self.say(b"STARTTLS")
        self.client.transport.startTLS(client_options())  # type: ignore[union-attr]
        self.pump.flush()
        self.say(b"EHLO client.example.org")  # the handshake is over
        layer = self.server.transport.protocol
        counter = CountingConnection(layer._tlsConnection)
        layer._tlsConnection = counter
        self.assertEqual(self.say(b"NOOP"), [str(replies.OK)])
        self.assertEqual(self.say(b"RSET"), [str(replies.RESET_OK)])
        self.assertEqual(counter.want_read, 0)

    def test_write_through_other_transports(self) -> None:
        """A transport without Twisted's batching TLS layer is left as it is."""
        transport = StringTransport()
        self.assertFalse(write_through(transport))

    def test_injection(self) -> None:
        """Plaintext pipelined after STARTTLS never runs, even once TLS is up."""
        self.client.take()
        self.say(b"EHLO client.example.org")
        self.assertEqual(self.say(b"STARTTLS\r\nMAIL FROM:<evil@example.com>"), ["220 2.0.0 Ready to start TLS"])
        self.client.transport.startTLS(client_options())  # type: ignore[union-attr]
        self.pump.flush()
        self.assertEqual(self.say(b"NOOP"), [str(replies.OK)])
        self.assertNotIn("validate_from", self.delegate.names())


class ImplicitTLSTests(SynchronousTestCase):
    """The submissions listener: TLS from the first byte."""

    def test_implicit_tls(self) -> None:
        """The greeting comes over TLS; STARTTLS is not offered, AUTH is; the session is TLS."""
        cert_path, key_path = write_pems(self.mktemp())
        clock = Clock()
        delegate = FakeDelegate()
        smtp_factory = SMTPServerFactory(ServerSettings(hostname=HOST, listener="submissions"), lambda: delegate, clock)
        server = implicit_tls_factory(smtp_factory, ReloadingContextFactory(cert_path, key_path)).buildProtocol(
            IPv4Address("TCP", "198.51.100.9", 50000)
        )
        client_factory = TLSMemoryBIOFactory(client_options(), True, Factory.forProtocol(LineClient), clock=clock)
        client = client_factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 465))
        pump = connect_pair(server, client, clock, transport_class=iosim.FakeTransport)
        line_client: LineClient = client.wrappedProtocol
        self.assertEqual(line_client.take(), ["220 mx.example.com ESMTP mailrelay ready"])
        self.assertTrue(delegate.calls[0][1].tls)
        line_client.send(b"EHLO client.example.org")
        pump.flush()
        ehlo = line_client.take()
        self.assertEqual(ehlo[-1], "250 AUTH PLAIN LOGIN")
        self.assertNotIn("250-STARTTLS", ehlo)
        line_client.send(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==")
        line_client.send(b"MAIL FROM:<alice@example.com>")
        pump.flush()
        self.assertEqual(line_client.take(), [str(replies.AUTH_SUCCESSFUL), str(replies.SENDER_OK)])
        session = delegate.calls[-1][1]
        self.assertEqual((session.tls, session.tls_version), (True, "TLSv1.3"))
        # Each reply goes out when written: the TLS layer without Twisted's batching.
        self.assertIs(type(server), DirectTLSProtocol)
        self.assertEqual(session.client_ip, "198.51.100.9")
