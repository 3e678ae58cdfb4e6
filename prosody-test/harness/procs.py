"""Processes of the test bed: start, watch and stop them by PID.

Every process is started in its own session (so a Ctrl-C at the terminal reaches only the harness, which then
stops them in order), is recorded in RUN_DIR/pids for the shell wrapper's fallback trap, and is stopped by its
PID (or, for ejabberd's shell-script-plus-su-plus-beam chain, by the process group it leads).
"""

import asyncio
import os
import signal
import socket
import subprocess
import time


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_listening(port: int) -> bool:
    """Whether something listens on TCP `port` (read from /proc, without connecting: a probe connection would
    show up in the servers' logs as a component that connected and left)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                        return True
        except (OSError, StopIteration, IndexError, ValueError):
            continue
    return False


async def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll `predicate` until it returns something truthy; raise TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(interval)


class Registry:
    """The PIDs this run started, mirrored to RUN_DIR/pids for the wrapper's fallback trap."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, "pids")
        self.live: dict[int, str] = {}

    def add(self, pid: int, name: str):
        self.live[pid] = name
        self._write()

    def remove(self, pid: int):
        self.live.pop(pid, None)
        self._write()

    def _write(self):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            for pid, name in self.live.items():
                # a negative id names the process group the process leads (kill -- -PGID)
                f.write(f"{pid} {name}\n")
        os.replace(tmp, self.path)


class Proc:
    """One started process, its output in a log file."""

    def __init__(self, registry: Registry, name: str, argv: list[str], log_path: str,
                 env: dict | None = None, cwd: str | None = None, stdout_path: str | None = None):
        self.registry = registry
        self.name = name
        self.log_path = log_path
        log = open(log_path, "ab")
        out = open(stdout_path, "ab") if stdout_path else log
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        self.popen = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=log, env=full_env, cwd=cwd,
            start_new_session=True,
        )
        log.close()
        if out is not log:
            out.close()
        self.pid = self.popen.pid
        # It leads its own session and process group: the group id is its PID.
        registry.add(-self.pid, name)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def returncode(self):
        return self.popen.poll()

    def send_signal(self, sig):
        if self.alive():
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill_group(self, sig=signal.SIGKILL):
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    async def wait_exit(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rc = self.popen.poll()
            if rc is not None:
                return rc
            await asyncio.sleep(0.02)
        return None

    async def stop(self, timeout: float = 10.0, sig=signal.SIGTERM) -> int | None:
        """Ask it to stop (SIGTERM by default), then SIGKILL its group if it does not. Returns the exit code."""
        rc = self.popen.poll()
        if rc is None:
            self.send_signal(sig)
            rc = await self.wait_exit(timeout)
        if rc is None:
            self.kill_group(signal.SIGKILL)
            rc = await self.wait_exit(5)
        else:
            # leftovers of the group (a child that ignored the parent's death), if any
            self.kill_group(signal.SIGKILL)
        self.registry.remove(-self.pid)
        return rc

    def stop_now(self):
        """Synchronous last resort, for cleanup paths that cannot await."""
        if self.popen.poll() is None:
            self.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self.kill_group(signal.SIGKILL)
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self.registry.remove(-self.pid)


def tail(path: str, lines: int = 25) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return f"({path}: missing)"
    text = data.decode("utf-8", "replace").splitlines()
    return "\n".join(text[-lines:])


class LogWatch:
    """Reads a log file from a mark onwards, to check what a server logged during one step."""

    def __init__(self, path: str):
        self.path = path

    def size(self) -> int:
        try:
            return os.path.getsize(self.path)
        except OSError:
            return 0

    def since(self, mark: int) -> str:
        try:
            with open(self.path, "rb") as f:
                f.seek(mark)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""
