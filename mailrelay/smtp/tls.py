"""
TLS for the SMTP listeners: server contexts from PEM files, a self-signed
certificate for the first start, certificate reloading, and the wrapper for
the implicit-TLS (``submissions``, RFC 8314) listener.

Certificates and keys are parsed with ``cryptography`` first, so a bad file
gives a ``TLSConfigError`` that names the file and the problem instead of an
OpenSSL error stack.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLContextFactory, IReactorTime
from twisted.internet.ssl import CertificateOptions, TLSVersion
from zope.interface import implementer

from mailrelay.smtp.protocol import SMTPServerFactory
from mailrelay.tlslayer import DirectTLSFactory

StrPath = str | os.PathLike[str]

_SELF_SIGNED_DAYS = 3650


class TLSConfigError(Exception):
    """A certificate or key file cannot be used; the message says why."""


def _read(path: StrPath, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise TLSConfigError(f"{what} file {os.fspath(path)!r} does not exist")
    except OSError as e:
        raise TLSConfigError(f"cannot read {what} file {os.fspath(path)!r}: {e.strerror or e}")


def load_certificate_chain(path: StrPath) -> list[x509.Certificate]:
    """The certificates in a PEM file: the leaf first, then intermediates."""
    data = _read(path, "certificate")
    try:
        chain = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TLSConfigError(f"certificate file {os.fspath(path)!r} holds no PEM certificate")
    return chain


def load_private_key(path: StrPath) -> PrivateKeyTypes:
    """The (unencrypted) private key in a PEM file."""
    data = _read(path, "private key")
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TLSConfigError(f"private key file {os.fspath(path)!r} is encrypted; give an unencrypted key")
    except ValueError:
        raise TLSConfigError(f"private key file {os.fspath(path)!r} holds no PEM private key")
    except Exception as e:  # cryptography raises UnsupportedAlgorithm too
        raise TLSConfigError(f"private key file {os.fspath(path)!r} cannot be used: {e}")


def _public_der(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined,no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def server_context_factory(cert_chain_pem_path: StrPath, key_pem_path: StrPath) -> CertificateOptions:
    """
    A TLS 1.2+ server context serving the full chain in
    ``cert_chain_pem_path`` (leaf first, then intermediates) with the key in
    ``key_pem_path``.

    Raises ``TLSConfigError`` when a file is missing, is not PEM, or the key
    does not belong to the leaf certificate.
    """
    chain = load_certificate_chain(cert_chain_pem_path)
    key = load_private_key(key_pem_path)
    leaf = chain[0]
    if _public_der(leaf.public_key()) != _public_der(key.public_key()):
        raise TLSConfigError(
            f"private key {os.fspath(key_pem_path)!r} does not match the certificate "
            f"{leaf.subject.rfc4514_string()!r}, the first one in {os.fspath(cert_chain_pem_path)!r}"
        )
    try:
        return CertificateOptions(
            privateKey=crypto.PKey.from_cryptography_key(key),  # type: ignore[arg-type]
            certificate=crypto.X509.from_cryptography(leaf),
            extraCertChain=[crypto.X509.from_cryptography(c) for c in chain[1:]],
            raiseMinimumTo=TLSVersion.TLSv1_2,
        )
    except (SSL.Error, crypto.Error, ValueError, TypeError) as e:
        raise TLSConfigError(f"cannot use {os.fspath(cert_chain_pem_path)!r}: {e}")


@implementer(IOpenSSLContextFactory)
class ReloadingContextFactory:
    """
    A server context factory whose certificate can be replaced while the
    server runs (after a renewal): ``reload()`` re-reads the files, and new
    connections use the new context; open ones keep theirs.  A bad file
    leaves the current certificate in place.
    """

    def __init__(self, cert_chain_pem_path: StrPath, key_pem_path: StrPath) -> None:
        self.cert_path = cert_chain_pem_path
        self.key_path = key_pem_path
        self._seen = self._stamp()
        self._options = server_context_factory(cert_chain_pem_path, key_pem_path)

    def getContext(self) -> SSL.Context:
        return self._options.getContext()

    def reload(self) -> None:
        """Re-read both files; raise ``TLSConfigError`` and keep the old ones if unusable."""
        self._options = server_context_factory(self.cert_path, self.key_path)

    def _stamp(self) -> tuple[tuple[int, int, int, int], ...] | None:
        # Through symbolic links (certbot's live/ names point at the newest files).
        try:
            stats = [os.stat(self.cert_path), os.stat(self.key_path)]
            return tuple((s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns) for s in stats)
        except OSError:
            return None

    def reload_if_changed(self) -> bool:
        """
        Reload if either file changed since it was last read; True if it did.
        A change that cannot be used raises ``TLSConfigError`` once and keeps
        the current certificate; the next change is tried again (a renewal
        that writes the certificate and the key one after the other).
        """
        stamp = self._stamp()
        if stamp is None or stamp == self._seen:
            return False
        self._seen = stamp
        self.reload()
        return True


def implicit_tls_factory(factory: SMTPServerFactory, context_factory: Any) -> DirectTLSFactory:
    """
    Wrap ``factory`` so every connection is TLS from its first byte, for the
    ``submissions`` listener (give its ``SMTPServerFactory`` settings with
    ``implicit_tls=True`` and no STARTTLS context).  Each write is encrypted
    at once (``mailrelay.tlslayer``): the server batches its replies.
    """
    return DirectTLSFactory(context_factory, False, factory, clock=factory.clock)


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _subject_alt_names(hostname: str) -> Sequence[x509.GeneralName]:
    try:
        return [x509.IPAddress(ipaddress.ip_address(hostname))]
    except ValueError:
        return [x509.DNSName(hostname)]


def ensure_self_signed(cert_path: StrPath, key_path: StrPath, hostname: str, clock: IReactorTime | None = None) -> bool:
    """
    On a first start without a certificate, create a self-signed RSA-2048
    one for ``hostname`` (valid ten years) so STARTTLS works at once; SMTP
    clients use TLS opportunistically and rarely verify.  The key file is
    created with mode 0600.

    Returns whether files were created.  If only one of the two files
    exists, raises ``TLSConfigError`` rather than overwrite it.
    """
    cert_file, key_file = Path(cert_path), Path(key_path)
    cert_exists, key_exists = cert_file.exists(), key_file.exists()
    if cert_exists and key_exists:
        return False
    if cert_exists or key_exists:
        present, missing = (cert_file, key_file) if cert_exists else (key_file, cert_file)
        raise TLSConfigError(
            f"{os.fspath(present)!r} exists but {os.fspath(missing)!r} does not; "
            "refusing to generate a new certificate over it"
        )
    now = datetime.datetime.fromtimestamp(
        clock.seconds() if clock is not None else datetime.datetime.now().timestamp(),
        tz=datetime.UTC,
    )
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64])])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=_SELF_SIGNED_DAYS))
        .add_extension(x509.SubjectAlternativeName(_subject_alt_names(hostname)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    for directory in {cert_file.parent, key_file.parent}:
        directory.mkdir(parents=True, exist_ok=True)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_atomically(key_file, key_pem, 0o600)
    _write_atomically(cert_file, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return True
