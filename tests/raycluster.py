"""A real Ray cluster on this machine for the tests: a head and a second node, each `ray start --block` in a
process group of its own (stopping it stops that node's processes, and no other Ray on the machine).

Every address is on loopback. Ray turns `--node-ip-address=127.0.0.1` into the machine's interface address
(it is `localhost` to Ray), so the nodes use 127.0.0.2, which is loopback too and which Ray takes as given.
The GCS port is outside Ray's worker port range (10002-19999); usage stats are off.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

HOST = "127.0.0.2"


def free_port() -> int:
    rng = random.Random(os.getpid() ^ time.time_ns())
    for _ in range(200):
        port = rng.randrange(20000, 30000)
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
        return port
    raise AssertionError("no free port")


class RayCluster:
    def __init__(self, nodes: int = 2) -> None:
        self.nodes = nodes
        self.port = free_port()
        self.address = f"{HOST}:{self.port}"
        # short: Ray's Unix sockets live under it and their paths must fit in 107 bytes
        self.temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
        self.procs: list[subprocess.Popen[bytes]] = []

    @staticmethod
    def env() -> dict[str, str]:
        """Usage stats off; no token (a token in ~/.ray from another cluster would lock the CLI out here)."""
        return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}

    def _start(self, args: list[str], log: str) -> None:
        ray = shutil.which("ray")
        assert ray, "the ray extra provides `ray`"
        proc = subprocess.Popen(
            [ray, "start", "--block", f"--node-ip-address={HOST}", "--num-cpus=1", *args],
            stdout=subprocess.DEVNULL,
            stderr=open(self.temp / log, "ab"),
            env=self.env(),
            start_new_session=True,
        )
        self.procs.append(proc)

    def start(self) -> RayCluster:
        try:
            self._start_nodes()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_nodes(self) -> None:
        self._start(
            [
                "--head",
                f"--port={self.port}",
                "--include-dashboard=false",
                "--disable-usage-stats",
                f"--temp-dir={self.temp}",
            ],
            "head.log",
        )
        self._wait(1)
        for k in range(1, self.nodes):
            self._start([f"--address={self.address}"], f"node{k}.log")
        self._wait(self.nodes)

    def _wait(self, nodes: int) -> None:
        deadline = time.time() + 120
        while time.time() < deadline:
            out = subprocess.run(
                ["ray", "status", f"--address={self.address}"], capture_output=True, text=True, env=self.env()
            ).stdout
            if out.count("node_") >= nodes and "Active:" in out:
                return
            time.sleep(1)
        raise AssertionError(f"the Ray cluster did not come up: {self.log()}")

    def log(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-1500:] for p in sorted(self.temp.glob("*.log")))

    def stop_head(self) -> None:
        self._stop(self.procs[0])

    def _stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        # `ray start --block` leaves its raylet and workers when killed: they are in its process group too
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        for proc in reversed(self.procs):
            self._stop(proc)
        shutil.rmtree(self.temp, ignore_errors=True)
