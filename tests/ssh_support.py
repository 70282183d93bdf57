"""A real OpenSSH sshd on 127.0.0.1 for the ssh:// source tests and bench, an ssh
client configuration that logs into it (RESCUE_SSH="ssh -F CONFIG"), and a TCP
relay that can delay every packet and cut connections after so many bytes."""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

SFTP_SERVER = next((p for p in ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server",
                                "/usr/libexec/sftp-server") if os.path.exists(p)), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sshd_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root to run a test sshd"
    if not os.path.exists("/usr/sbin/sshd") or not shutil.which("ssh") or not shutil.which("ssh-keygen"):
        return "needs openssh-server and openssh-client"
    return None


class SshServer:
    """sshd with its own host key; `sftp` is 'server' (sftp-server), 'internal'
    (internal-sftp: works for users whose shell is nologin) or None (no subsystem)."""

    def __init__(self, base: Path, *, sftp: str | None = "server", passwords: bool = False) -> None:
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        for name in ("host", "client"):
            if not (base / name).exists():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(base / name)], check=True)
        # sshd reads the keys as the user logging in (nobody too): outside pytest's 0700 tmp
        fd, self.authorized_keys = tempfile.mkstemp(prefix="rescue-test-keys-", dir="/tmp")
        os.write(fd, (base / "client.pub").read_bytes())
        os.close(fd)
        os.chmod(self.authorized_keys, 0o644)
        self.port = free_port()
        lines = [f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {base / 'host'}",
                 f"PidFile {base / 'sshd.pid'}", f"AuthorizedKeysFile {self.authorized_keys}",
                 "StrictModes no", f"PasswordAuthentication {'yes' if passwords else 'no'}",
                 "KbdInteractiveAuthentication no", "UsePAM no",
                 f"PermitRootLogin {'yes' if passwords else 'prohibit-password'}", "MaxStartups 50"]
        if sftp == "server":
            lines.append(f"Subsystem sftp {SFTP_SERVER}")
        elif sftp == "internal":
            lines.append("Subsystem sftp internal-sftp")
        self.config = base / "sshd_config"
        self.config.write_text("\n".join(lines) + "\n")
        self.known_hosts = base / "known_hosts"
        self.known_hosts.write_text("rescue-test-host " + " ".join((base / "host.pub").read_text().split()[:2]) + "\n")
        os.makedirs("/run/sshd", exist_ok=True)
        self.log = open(base / "sshd.log", "wb")
        self.proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(self.config)],
                                     stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL)
        end = time.time() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    break
            except OSError:
                if self.proc.poll() is not None or time.time() > end:
                    self.stop()
                    raise RuntimeError(f"sshd did not start: {(base / 'sshd.log').read_text()[-500:]}")
                time.sleep(0.05)
        self.client_config = base / "ssh_config"
        self.hosts: dict[str, int] = {}
        self.add_host("rtest", self.port)

    def add_host(self, alias: str, port: int, *, known_hosts: Path | None = None) -> str:
        """A Host block for `alias` on `port` (a relay in front of this server)."""
        self.hosts[alias] = port
        blocks = []
        for name, p in self.hosts.items():
            kh = known_hosts if (known_hosts and name == alias) else self.known_hosts
            blocks.append(f"Host {name}\n  HostName 127.0.0.1\n  Port {p}\n  User root\n"
                          f"  IdentityFile {self.base / 'client'}\n  IdentitiesOnly yes\n"
                          f"  UserKnownHostsFile {kh}\n  GlobalKnownHostsFile /dev/null\n"
                          "  HostKeyAlias rescue-test-host\n  StrictHostKeyChecking yes\n  LogLevel ERROR\n")
        self.client_config.write_text("\n".join(blocks))
        return alias

    @property
    def env(self) -> dict[str, str]:
        return {"RESCUE_SSH": f"ssh -F {self.client_config}"}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        with contextlib.suppress(OSError):
            os.unlink(self.authorized_keys)


class Relay:
    """127.0.0.1:port -> 127.0.0.1:target. `delay` seconds added to every packet in
    each direction; `cuts` = totals of server->client bytes at which the current
    connection is cut (each once). `up`/`down` count bytes each way."""

    def __init__(self, target: int, *, delay: float = 0.0, cuts: tuple[int, ...] = ()) -> None:
        self.target = target
        self.delay = delay
        self.cuts = sorted(cuts)
        self.cut_count = 0
        self.up = self.down = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._listen = socket.socket()
        self._listen.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listen.bind(("127.0.0.1", 0))
        self._listen.listen(16)
        self.port = self._listen.getsockname()[1]
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listen.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            self.connections += 1
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = (client, server)
            self._pump(client, server, pair, "up")
            self._pump(server, client, pair, "down")

    def _pump(self, src: socket.socket, dst: socket.socket, pair, way: str) -> None:
        q: queue.Queue = queue.Queue()

        def reader() -> None:
            while True:
                try:
                    data = src.recv(65536)
                except OSError:
                    data = b""
                q.put((time.monotonic() + self.delay, data))
                if not data:
                    return
                cut = False
                with self._lock:
                    if way == "up":
                        self.up += len(data)
                    else:
                        self.down += len(data)
                        if self.cuts and self.down >= self.cuts[0]:
                            self.cuts.pop(0)
                            self.cut_count += 1
                            cut = True
                if cut:
                    for s in pair:
                        try:
                            s.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
                        s.close()
                    return

        def writer() -> None:
            while True:
                due, data = q.get()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if not data:
                    try:
                        dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    return
                try:
                    dst.sendall(data)
                except OSError:
                    return

        threading.Thread(target=reader, daemon=True).start()
        threading.Thread(target=writer, daemon=True).start()

    def stop(self) -> None:
        self._stopped = True
        self._listen.close()
