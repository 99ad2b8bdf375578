"""
End-to-end benchmark: messages in through submission (STARTTLS + AUTH,
smtplib), out to a sink SMTP server, DKIM-signed with VERP return paths,
through the real ``twistd mailrelay``.

    .venv/bin/python bench/e2e_bench.py [--messages 2000] [--clients 8] [--recipients 1] [--domains 20] [--sink-tls]

The DNS server and the sink run in this process (Twisted); the SMTP clients
in threads, one connection per client, many messages per connection.  It
prints the accept rate (250s per second), the delivery rate (copies at the
sink per second, from the first 250 to the last copy) and the relay's CPU
time per message, read from /proc.  With ``--sink-tls`` the sink offers
STARTTLS (a certificate made here) and the relay delivers over it, as it
does to most MX hosts.
"""

from __future__ import annotations

import argparse
import os
import shutil
import smtplib
import ssl
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import deferLater, react
from twisted.internet.threads import deferToThread

from tests.support.dns_server import start_dns_server
from tests.support.relay import RelayProcess
from tests.support.sink import make_tls, start_sink


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def client(port: int, count: int, recipients: list[str], body: bytes) -> float:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    smtp = smtplib.SMTP("127.0.0.1", port, timeout=60)
    smtp.starttls(context=context)
    smtp.login("shop", "shop-password")
    first = 0.0
    for i in range(count):
        smtp.sendmail("hello@example.com", recipients, body)
        if i == 0:
            first = time.monotonic()
    smtp.quit()
    return first


async def main(reactor: Any, args: argparse.Namespace) -> None:
    domains = [f"d{i}.example" for i in range(args.domains)]
    zone: dict[str, Any] = {"mx.test": {"A": ["127.0.0.1"]}, "example.com": {"MX": [(10, "mx.test")]}}
    for d in domains:
        zone[d] = {"MX": [(10, "mx.test")]}
    dns_port, stop_dns = start_dns_server(reactor, zone)
    sink = start_sink(reactor, tls=make_tls("mx.test").server_options if args.sink_tls else None)
    directory = Path(tempfile.mkdtemp(prefix="mailrelay-bench-"))
    extra = (
        f"[delivery]\nremote_port = {sink.port}\nretry_min = 1\nretry_max = 2\nqueue_high_water = 1000000\n"
        f'[dns]\nnameservers = ["127.0.0.1:{dns_port}"]\n'
        "[smtp]\nmax_connections_per_ip = 1000\n"
    )
    relay = RelayProcess(directory, extra=extra, listeners={"submission": ["tcp:0:interface=127.0.0.1"]})
    try:

        def setup() -> None:
            relay.mailrelay("account", "create", "shop", stdin="shop-password\n")
            relay.mailrelay("domain", "add", "shop", "example.com")
            relay.mailrelay("domain", "verify", "example.com", "--force")
            relay.start()

        await deferToThread(setup)
        assert relay.process is not None
        port = relay.port("submission")
        body = (
            b"From: Shop <hello@example.com>\r\nTo: customer@example.net\r\nSubject: Your order\r\n"
            b"Content-Type: text/plain\r\n\r\n" + b"Thank you for your order.\r\n" * 40
        )
        per_client = args.messages // args.clients
        total = per_client * args.clients * args.recipients
        cpu0 = cpu_seconds(relay.process.pid)
        start = time.monotonic()
        jobs = []
        for c in range(args.clients):
            rcpts = [f"c{c}r{r}@{domains[(c + r) % len(domains)]}" for r in range(args.recipients)]
            jobs.append(deferToThread(client, port, per_client, rcpts, body))
        results = await DeferredList(jobs, fireOnOneErrback=True, consumeErrors=True)
        accepted = time.monotonic()
        while len(sink.messages) < total:
            if time.monotonic() - accepted > 300:
                raise SystemExit(f"only {len(sink.messages)} of {total} copies arrived")
            await deferLater(reactor, 0.05, lambda: None)
        done = time.monotonic()
        cpu = cpu_seconds(relay.process.pid) - cpu0
        messages = per_client * args.clients
        first = min(r[1] for r in results)
        print(f"{messages} messages x {args.recipients} recipient(s), {args.clients} clients, {args.domains} domains")
        print(f"accepted:  {messages / (accepted - start):8.0f} messages/s")
        print(f"delivered: {total / (done - first):8.0f} copies/s (first 250 to last copy at the sink)")
        print(f"relay CPU: {cpu * 1000 / messages:8.2f} ms per message ({cpu:.1f} s)")
        encrypted = sum(1 for m in sink.messages if m.tls)
        print(f"over TLS:  {encrypted}/{len(sink.messages)} copies")
        signed = sum(1 for m in sink.messages if m.data.startswith(b"DKIM-Signature:"))
        print(f"DKIM-signed copies: {signed}/{len(sink.messages)}")
    finally:
        relay.stop()
        await stop_dns()
        await sink.stop()
        shutil.rmtree(directory, True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--recipients", type=int, default=1)
    parser.add_argument("--domains", type=int, default=20)
    parser.add_argument("--sink-tls", action="store_true", help="the sink offers STARTTLS and the relay uses it")
    args = parser.parse_args()

    def run(reactor: Any) -> Deferred[None]:
        return Deferred.fromCoroutine(main(reactor, args))

    react(run)
