"""
The end-to-end tier: the real ``twistd mailrelay`` in a child process,
on loopback ports picked by the kernel (``tcp:0``).

``RelayProcess`` writes a configuration into a temporary directory, starts
twistd, waits for ``listeners.json`` (written once every listener is up) and
stops it with SIGTERM (or SIGKILL for crash tests).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TWISTD = str(Path(sys.executable).with_name("twistd"))


class RelayProcess:
    def __init__(
        self,
        directory: Path,
        database_url: str | None = None,
        extra: str = "",
        listeners: dict[str, list[str]] | None = None,
    ) -> None:
        self.dir = directory.resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data = self.dir / "data"
        self.config = self.dir / "mailrelay.toml"
        modes = (
            listeners
            if listeners is not None
            else {
                "smtp": ["tcp:0:interface=127.0.0.1"],
                "submission": ["tcp:0:interface=127.0.0.1"],
                "submissions": ["tcp:0:interface=127.0.0.1"],
                "http": ["tcp:0:interface=127.0.0.1"],
            }
        )
        lines = [f'[server]\nhostname = "relay.test"\ndata_dir = "{self.data}"', "[listeners]"]
        for mode in ("smtp", "submission", "submissions", "http"):
            lines.append(f"{mode} = {json.dumps(modes.get(mode, []))}")
        if database_url:
            lines.append(f'[database]\nurl = "{database_url}"')
        self.config.write_text("\n".join(lines) + "\n" + extra)
        self.process: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "twistd.log"

    def start(self, timeout: float = 30.0, expect_failure: bool = False) -> subprocess.Popen[bytes]:
        state = self.data / "listeners.json"
        if state.exists():
            state.unlink()
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [TWISTD, "-n", "--pidfile=", "--logfile=-", "mailrelay", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
            )
        if expect_failure:
            self.process.wait(timeout)
            return self.process
        deadline = time.monotonic() + timeout
        while not state.exists():
            if self.process.poll() is not None:
                raise AssertionError(f"twistd exited with {self.process.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"twistd did not start within {timeout}s:\n{self.output()}")
            time.sleep(0.05)
        return self.process

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def ports(self) -> dict[str, list[int]]:
        found: dict[str, list[int]] = {}
        for entry in json.loads((self.data / "listeners.json").read_text()):
            found.setdefault(entry["mode"], []).append(entry["port"])
        return found

    def port(self, mode: str) -> int:
        return self.ports()[mode][0]

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait; returns the exit status."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: the crash the spool must survive."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(30)

    def mailrelay(self, *argv: str, stdin: str = "") -> Any:
        """Run the admin command on this relay's data; returns its parsed --json output."""
        cli = str(Path(sys.executable).with_name("mailrelay"))
        result = subprocess.run(
            [cli, "--config", str(self.config), "--json", *argv], input=stdin.encode(), capture_output=True, timeout=60
        )
        out = result.stdout.decode()
        if result.returncode:
            raise AssertionError(
                f"mailrelay {' '.join(argv)} failed ({result.returncode}): {out}{result.stderr.decode()}"
            )
        return json.loads(out) if out.strip() else None
