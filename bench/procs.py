"""Child-process bookkeeping: start, wait for readiness, measure, and always clean up.

Every child (servers *and* short-lived load tools) is started in its own session
(process group) and registered with a :class:`Supervisor`; ``Supervisor.close``
sends SIGTERM to each group, then SIGKILL to whatever is left. ``run.main`` uses
the supervisor as a context manager and turns SIGTERM/SIGHUP into SystemExit, so
the cleanup runs on normal exit, on errors and on Ctrl-C alike.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.tools import (
    listening_ports,
    parse_vmrss_kib,
    pid_stat_session_ticks,
    proc_stat_busy_ticks,
)

# Debian package for each external program the harness drives.
DEBIAN_PACKAGES = {
    "nginx": "nginx-light",
    "haproxy": "haproxy",
    "wrk": "wrk",
    "h2load": "nghttp2-client",
    "iperf3": "iperf3",
    "curl": "curl",
}

NOFILE_WANTED = 65536


class StartError(RuntimeError):
    """A server did not come up (exited, or not ready in time)."""


def which(program: str) -> str | None:
    """Find a program on PATH, plus sbin dirs (haproxy and nginx live there on Debian)."""
    extra = os.pathsep.join(["/usr/sbin", "/usr/local/sbin", "/sbin"])
    return shutil.which(program, path=os.environ.get("PATH", "") + os.pathsep + extra)


def twistd_path() -> str | None:
    """twistd of the interpreter running the harness (the venv), else the one on PATH."""
    local = Path(sys.executable).with_name("twistd")
    return str(local) if local.exists() else shutil.which("twistd")


def missing_programs() -> dict[str, str]:
    """Programs not found -> the Debian package that provides them."""
    return {p: pkg for p, pkg in DEBIAN_PACKAGES.items() if which(p) is None}


def free_port() -> int:
    """A currently free loopback TCP port (bind port 0, read it back, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_block(count: int, avoid: frozenset[int] = frozenset(), tries: int = 200) -> int:
    """A base port B with B..B+count-1 all currently free on loopback (``l5dproxy --workers
    N`` serves worker I's admin server on the admin port + I) and none of them in ``avoid``."""
    for _ in range(tries):
        base = free_port()
        ports = range(base, base + count)
        if ports[-1] > 65535 or avoid.intersection(ports):
            continue
        socks: list[socket.socket] = []
        try:
            for port in ports:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise StartError(f"found no {count} consecutive free ports in {tries} tries")


def session_processes(*sids: int) -> dict[int, int]:
    """Every live process of the sessions ``sids`` -> its CPU ticks (utime + stime) so far.

    A child the Supervisor starts is a session leader, and whatever it forks without
    ``setsid`` (``l5dproxy --workers N`` spawns workers 1..N-1 that way, nginx and
    HAProxy their workers) stays in it."""
    found: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "stat").read_text()
            s, ticks = pid_stat_session_ticks(text)
        except (OSError, ValueError, IndexError):
            continue
        if s in sids and text.rsplit(")", 1)[1].split()[0] != "Z":
            found[int(entry.name)] = ticks
    return found


def clock_ticks_per_second() -> int:
    return os.sysconf("SC_CLK_TCK")


def cpu_seconds_between(before: dict[int, int], after: dict[int, int],
                        hz: int | None = None) -> float:
    """CPU seconds (utime + stime) used between two :func:`session_processes` readings
    (pid -> clock ticks) by the processes present in both; ``hz`` ticks per second
    (default: the kernel's ``SC_CLK_TCK``). A process gone by ``after`` loses what it
    used since ``before``, one that appeared after ``before`` is not counted: callers
    compare the two pid sets to tell whether that happened."""
    ticks = sum(after[pid] - t for pid, t in before.items() if pid in after)
    return ticks / (hz or clock_ticks_per_second())


class CpuWindow:
    """The CPU the processes of some sessions (a target's every process: l5dproxy and
    its ``--workers`` children, HAProxy, nginx's master and worker) use from ``start``
    (or ``delay`` seconds after it, e.g. past a load tool's warm-up) until ``stop``."""

    def __init__(self, sids: Collection[int]) -> None:
        self.sids = tuple(sids)
        self.before: dict[int, int] = {}
        self.after: dict[int, int] = {}
        self._timer: threading.Timer | None = None

    def _snap(self) -> None:
        self.before = session_processes(*self.sids)

    def start(self, delay: float = 0.0) -> None:
        if delay > 0:
            self._timer = threading.Timer(delay, self._snap)
            self._timer.daemon = True
            self._timer.start()
        else:
            self._snap()

    def stop(self) -> float | None:
        """CPU seconds used in the window; None if it never began (the run ended before
        ``delay``) or no process was found."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer.join()
        self.after = session_processes(*self.sids)
        if not self.before:
            return None
        return cpu_seconds_between(self.before, self.after)

    @property
    def same_processes(self) -> bool:
        """Whether the same processes ran from start to stop (none died or was added)."""
        return set(self.before) == set(self.after)


def raise_nofile(wanted: int = NOFILE_WANTED) -> int:
    """Raise RLIMIT_NOFILE as far as allowed (hard limit too when root); return the soft limit."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for new_hard in (max(hard, wanted), hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, new_hard), new_hard))
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _child_preexec() -> None:  # runs in the child between fork and exec
    raise_nofile()


def rss_kib(pid: int) -> int:
    return parse_vmrss_kib(Path(f"/proc/{pid}/status").read_text())


def pid_stat_ticks(pid: int) -> int:
    """CPU clock ticks (utime + stime) ``pid`` has used so far."""
    return pid_stat_session_ticks(Path(f"/proc/{pid}/stat").read_text())[1]


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class CpuMeter:
    """How much CPU processes *other* than ours (the harness and every session it
    started) used between two readings, as a percentage of the whole machine."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self._start: tuple[int, int, int] | None = None

    def _read(self) -> tuple[int, int, int]:
        busy, total = proc_stat_busy_ticks(Path("/proc/stat").read_text())
        sessions = {c.pid for c in self.sup.children} | {os.getsid(0)}
        ours = 0
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                sid, ticks = pid_stat_session_ticks(Path(entry.path, "stat").read_text())
            except (OSError, ValueError, IndexError):
                continue
            if sid in sessions:
                ours += ticks
        # Tools that already exited were reaped by us: their CPU is in our children's usage.
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        ours += round((ru.ru_utime + ru.ru_stime) * os.sysconf("SC_CLK_TCK"))
        return busy, total, ours

    def start(self) -> None:
        self._start = self._read()

    def other_pct(self) -> float:
        """Other processes' share of all CPUs since ``start`` (0-100)."""
        if self._start is None:
            return float("nan")
        b0, t0, o0 = self._start
        b1, t1, o1 = self._read()
        if t1 <= t0:
            return 0.0
        return max(0.0, 100.0 * ((b1 - b0) - (o1 - o0)) / (t1 - t0))


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes]
    log_path: Path | None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


@dataclass
class ToolRun:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float


class Supervisor:
    """Owns every child process; closing it kills them all (process groups)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.children: list[Child] = []

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, name: str, argv: Sequence[str], cwd: Path | None = None,
              env: dict[str, str] | None = None) -> Child:
        """Start a long-running server; its stdout+stderr go to WORKDIR/NAME.log."""
        log_path = self.workdir / f"{name}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                list(argv),
                cwd=cwd or self.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_child_preexec,
            )
        child = Child(name, list(argv), proc, log_path)
        self.children.append(child)
        return child

    def run(self, argv: Sequence[str], timeout: float) -> ToolRun:
        """Run a load tool to completion (killed after ``timeout`` seconds)."""
        started = time.monotonic()
        proc = subprocess.Popen(
            list(argv),
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=_child_preexec,
        )
        child = Child(Path(argv[0]).name, list(argv), proc, None)
        self.children.append(child)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc, grace=0.5)
            out, err = proc.communicate()
            err += f"\n[bench] killed after {timeout:.0f}s timeout".encode()
        finally:
            if proc.poll() is None:
                _kill_group(proc, grace=0.5)
            self.children.remove(child)
        return ToolRun(list(argv), proc.returncode, out.decode(errors="replace"),
                       err.decode(errors="replace"), time.monotonic() - started)

    def stop(self, child: Child, grace: float = 3.0) -> None:
        _kill_group(child.proc, grace)
        _kill_leftovers(child)
        if child in self.children:
            self.children.remove(child)

    def close(self) -> None:
        # SIGTERM everybody first, then give them a shared grace period.
        for child in self.children:
            _signal_group(child.proc, signal.SIGTERM)
        deadline = time.monotonic() + 3.0
        for child in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        for child in self.children:
            _signal_group(child.proc, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(timeout=1.0)
        # Anything still in a child's session (it left the process group) goes too: the
        # processes counted here were all started by this harness.
        for child in self.children:
            _kill_leftovers(child)
        self.children.clear()


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    # The child is a session leader, so its pgid is its pid. Signal the group even if the
    # leader already exited (a forked grandchild may remain); ignore "no such process".
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _kill_leftovers(child: Child) -> None:
    """SIGKILL whatever is still in the child's session after its group was killed (a
    process that left the group); every process counted here was started by the harness."""
    for pid in session_processes(child.pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
            print(f"[bench] killed pid {pid} left over from {child.name}", file=sys.stderr,
                  flush=True)


def _kill_group(proc: subprocess.Popen[bytes], grace: float) -> None:
    _signal_group(proc, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    _signal_group(proc, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=2.0)


def install_exit_signals() -> None:
    """Make SIGTERM/SIGHUP raise SystemExit so ``finally``/``with`` cleanup runs."""

    def _raise(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise)


# ------------------------------------------------------------------ readiness


def wait_until(check: Callable[[], bool], child: Child | None, timeout: float,
               what: str, interval: float = 0.05) -> None:
    """Poll ``check`` until it is true; raise StartError on timeout or child exit."""
    deadline = time.monotonic() + timeout
    while True:
        if child is not None and not child.alive():
            raise StartError(
                f"{child.name} exited with status {child.proc.returncode} before {what}; "
                f"log tail:\n{child.log_tail()}"
            )
        if check():
            return
        if time.monotonic() > deadline:
            tail = child.log_tail() if child is not None else ""
            raise StartError(f"timed out after {timeout:.0f}s waiting for {what}\n{tail}")
        time.sleep(interval)


def http_status(url: str, timeout: float = 1.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, ValueError):
        return None


def is_listening(port: int) -> bool:
    """Whether something listens on ``port``, read from /proc/net/tcp (no probe connection,
    which iperf3 and the relays in front of it would see as a bogus client)."""
    ports: set[int] = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            ports |= listening_ports(Path(name).read_text())
    return port in ports


def wait_tcp(child: Child, port: int, timeout: float = 15.0) -> None:
    wait_until(lambda: is_listening(port), child, timeout, f"{child.name} to listen on {port}")


def wait_http_ok(child: Child, url: str, timeout: float = 30.0) -> None:
    wait_until(lambda: http_status(url) == 200, child, timeout, f"200 from {url}",
               interval=0.1)
