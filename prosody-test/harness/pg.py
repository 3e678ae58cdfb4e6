"""A throwaway PostgreSQL for the scenarios that share a store between knocks (19, 20): testkit's `pg-cluster`
(the same code as `TempCluster` in `cargo test`, and as lib/postgres.sh) run with `--control-stdin`.

It prints one JSON line when the cluster accepts connections (`url`, `port`, `password`, ...), then answers
`stop`, `start`, `kill9` and `sql <statement>` on stdin with one JSON line each. Its stdin is a pipe this
process holds, so if the harness dies pg-cluster sees end of input and removes the cluster itself; SIGTERM
does the same. `run` makes sure Debian's server is installed (lib/postgres.sh's pg_ensure_installed).
"""

import asyncio
import json
import os
import signal
import time

from procs import Registry


class PgCluster:
    def __init__(self, registry: Registry, bin_path: str, run_dir: str):
        self.registry = registry
        self.bin = bin_path
        self.dir = run_dir
        self.log_file = os.path.join(run_dir, "pg-cluster.log")
        self.proc = None
        self.info: dict = {}
        self.password_file = os.path.join(run_dir, "db.password")

    async def start(self, timeout: float = 60.0):
        if not os.access(self.bin, os.X_OK):
            raise RuntimeError(f"{self.bin} missing: `cargo build --workspace --bins` builds it (testkit)")
        os.makedirs(self.dir, exist_ok=True)
        t0 = time.monotonic()
        with open(self.log_file, "ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                self.bin, "--control-stdin", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=log, start_new_session=True)
        self.registry.add(-self.proc.pid, "pg-cluster")
        event = await self._answer(timeout, "start")
        if event.get("event") != "ready":
            raise RuntimeError(f"pg-cluster did not start: {event}")
        self.info = event
        # knock reads the password from a file (never in the URL); knock runs as this user
        fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(event["password"] + "\n")
        self.started_in = time.monotonic() - t0

    @property
    def url(self) -> str:
        """`postgres://knock@127.0.0.1:PORT/knock`: no password in it (knock refuses one)."""
        return f"postgres://{self.info['user']}@127.0.0.1:{self.info['port']}/{self.info['database']}"

    def store_toml(self) -> str:
        """knock's [store] lines for this database (key_file is the Knock's own)."""
        return (f'engine = "postgres"\nurl = "{self.url}"\npassword_file = "{self.password_file}"')

    async def _answer(self, timeout: float, what: str) -> dict:
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except asyncio.TimeoutError:
            raise RuntimeError(f"pg-cluster did not answer {what!r} within {timeout:g} s")
        if not line:
            with open(self.log_file, errors="replace") as f:
                raise RuntimeError(f"pg-cluster exited during {what!r}: {f.read()[-600:]}")
        return json.loads(line)

    async def ctl(self, command: str, timeout: float = 60.0) -> dict:
        """`stop`, `start`, `kill9` or `sql ...`: pg-cluster's answer; an error event raises."""
        self.proc.stdin.write(command.encode() + b"\n")
        await self.proc.stdin.drain()
        event = await self._answer(timeout, command)
        if event.get("event") == "error":
            raise RuntimeError(f"pg-cluster {command.split()[0]}: {event.get('error')}")
        return event

    async def sql(self, statement: str) -> str:
        return (await self.ctl(f"sql {statement}"))["output"]

    async def count(self, table: str = "knock_registrations") -> int:
        """SELECT count(*) from `table`, read from psql's output."""
        out = await self.sql(f"SELECT count(*) AS n FROM {table}")
        numbers = [l.strip() for l in out.splitlines() if l.strip().isdigit()]
        if not numbers:
            raise RuntimeError(f"no count in psql's output: {out!r}")
        return int(numbers[0])

    async def stop(self):
        """SIGTERM: pg-cluster stops the server and removes its directory."""
        if self.proc is None:
            return
        if self.proc.returncode is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                await asyncio.wait_for(self.proc.wait(), 40)
            except asyncio.TimeoutError:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                await self.proc.wait()
        self.registry.remove(-self.proc.pid)
        self.proc = None
