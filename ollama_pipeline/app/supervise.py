"""Child servers for `ollama-pipeline ui`: start each in its own session, wait until it answers HTTP, stop it
with every process it started (SIGTERM to it, then to its process group, SIGKILL after a grace period).

Why sessions: `dagster dev` started in the background from a script does not stop on SIGINT, and its code
server and daemon outlive it unless its whole process group is stopped; in a session of its own, the child
gets only the signals sent to it here, in the order `stop_all` chooses. Why /proc: a
process group alone misses a grandchild that made its own session, and a zombie still counts as a member, so
on Linux the members are read from /proc (pid, group, session, parent, start time); elsewhere
`os.killpg(pgid, 0)` is the fallback. This module knows nothing about the pipeline, Dagster or Ollama.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROC = Path("/proc")
ProcessId = tuple[int, int]  # (pid, start time): a pid that was reused is another process


@dataclass
class Child:
    """One started server: its name, the URL that answers 200 once it is ready, its process and log file."""

    name: str
    ready_url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    ready_headers: dict[str, str] = field(default_factory=dict)
    last_answer: str = "no answer yet"
    ready_after_s: float | None = None
    stopped_by: str | None = None
    known: set[ProcessId] = field(default_factory=set)
    killed_commands: list[str] = field(default_factory=list)

    @property
    def pgid(self) -> int:
        return self.proc.pid  # the leader of its own session and process group

    def tail(self, lines: int = 15) -> str:
        """The last lines of its output (stdout and stderr), for error messages."""
        try:
            text = self.log_path.read_bytes()[-16_000:].decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class StartError(RuntimeError):
    """A child server exited or did not answer in time; names it and carries its last output lines."""

    def __init__(self, child: Child, reason: str) -> None:
        super().__init__(f"{child.name} {reason}")
        self.child = child
        self.reason = reason


def start_child(name: str, argv: list[str], *, env: dict[str, str], cwd: Path, log_path: Path,
                ready_url: str, ready_headers: dict[str, str] | None = None) -> Child:
    """Start argv in a new session (so it leads its own process group), its output written to log_path.

    Signals the caller handles are reset to their default by exec, so the child starts with SIGINT at its
    default as long as the caller has installed its handlers (see `install_stop_handlers`) and does not
    ignore SIGINT; this avoids running Python code between fork and exec while other threads run.
    """
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        raise RuntimeError("SIGINT is ignored: a child would inherit that; call install_stop_handlers first")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:  # a fresh log, so its tail is this start's output
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return Child(name=name, ready_url=ready_url, proc=proc, log_path=log_path, ready_headers=dict(ready_headers or {}))


StopSignals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def install_stop_handlers(on_stop: Callable[[int], None]) -> dict[int, Any]:
    """Route SIGINT, SIGTERM and SIGHUP to on_stop(signal number); returns the handlers they replace."""
    previous = {}
    for sig in StopSignals:
        previous[sig] = signal.signal(sig, lambda signum, _frame: on_stop(signum))
    return previous


def restore_handlers(previous: dict[int, Any]) -> None:
    """Put back the handlers install_stop_handlers replaced."""
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def http_status(url: str, *, headers: dict[str, str] | None = None, timeout: float = 2.0) -> int | None:
    """The HTTP status GET url answers with; None when nothing answers."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return None


def wait_ready(children: Iterable[Child], *, timeout: float, should_stop: Callable[[], bool]) -> bool:
    """Wait until every child answers its URL; False if asked to stop first. Raises StartError naming the
    first child that exited or did not answer within timeout seconds."""
    started = time.monotonic()
    waiting = list(children)
    while waiting:
        if should_stop():
            return False
        for child in list(waiting):
            code = child.proc.poll()
            if code is not None:
                raise StartError(child, f"exited with code {code} before answering {child.ready_url}")
            status = http_status(child.ready_url, headers=child.ready_headers, timeout=1.0)
            if status is not None:
                child.last_answer = f"last answer: HTTP {status}"
            if status == 200:
                child.ready_after_s = time.monotonic() - started
                waiting.remove(child)
        if waiting and time.monotonic() - started > timeout:
            late = waiting[0]
            raise StartError(late, f"did not answer {late.ready_url} with 200 within {timeout:.0f} s "
                                   f"({late.last_answer})")
        if waiting:
            time.sleep(0.25)
    return True


# ---- finding every process a child started ------------------------------------------------------------


@dataclass(frozen=True)
class _Stat:
    pid: int
    ppid: int
    pgid: int
    sid: int
    start: int
    zombie: bool


def _stat(pid: int) -> _Stat | None:
    try:
        raw = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    rest = raw[raw.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return _Stat(pid=pid, ppid=int(rest[1]), pgid=int(rest[2]), sid=int(rest[3]), start=int(rest[19]),
                 zombie=rest[0] in ("Z", "X"))


def _all_stats() -> list[_Stat]:
    stats = []
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (found := _stat(int(entry.name))) is not None:
            stats.append(found)
    return stats


def members(child: Child) -> set[ProcessId]:
    """Live processes of the child: its group and session, and every descendant of its leader."""
    if not PROC.is_dir():
        return set()
    stats = [s for s in _all_stats() if not s.zombie]
    by_parent: dict[int, list[_Stat]] = {}
    for s in stats:
        by_parent.setdefault(s.ppid, []).append(s)
    found = {(s.pid, s.start) for s in stats if child.pgid in (s.pgid, s.sid)}
    todo = [child.proc.pid]
    while todo:
        for s in by_parent.get(todo.pop(), []):
            if (s.pid, s.start) not in found:
                found.add((s.pid, s.start))
                todo.append(s.pid)
    return found


def _command(pid: int) -> str:
    try:
        return (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return f"pid {pid}"


def _alive(process: ProcessId) -> bool:
    s = _stat(process[0])
    return s is not None and s.start == process[1] and not s.zombie


def remaining(child: Child) -> set[ProcessId]:
    """Processes of the child still running (known ones plus any new member of its group or session)."""
    child.proc.poll()  # reap the leader so it does not linger as a zombie
    if not PROC.is_dir():
        try:
            os.killpg(child.pgid, 0)
        except ProcessLookupError:
            return set()
        return {(child.pgid, 0)}
    return {p for p in child.known if _alive(p)} | members(child)


def _signal_all(child: Child, sig: signal.Signals, processes: set[ProcessId]) -> None:
    """sig to the child's process group, and to each given process outside it (one signal per process:
    a second SIGTERM would interrupt Dagster's own orderly shutdown)."""
    try:
        os.killpg(child.pgid, sig)
    except ProcessLookupError:
        pass
    for pid, start in processes:
        s = _stat(pid)
        if s is not None and s.start == start and s.pgid != child.pgid:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def stop_all(children: list[Child], *, grace: float = 30.0) -> list[str]:
    """Stop every child within grace seconds and return the names of those that needed SIGKILL; afterwards
    none of their processes runs.

    SIGTERM goes first to each leader alone, then, once a leader has exited, to whatever is left of its group
    (and to descendants that left it); SIGKILL ends what still runs at the deadline. Measured with
    `dagster dev`: SIGTERM to its whole group at once left its code server and that server's gRPC child
    waiting on each other for over 30 s in one try of three, while leader-first shut down cleanly in 4-5 s
    in eight of eight (dagster dev stops its webserver, daemon and code server in order).
    """
    for child in children:
        child.known |= members(child)
        if child.proc.poll() is None:
            child.proc.send_signal(signal.SIGTERM)
        child.stopped_by = "SIGTERM"
    swept: set[str] = set()
    deadline = time.monotonic() + grace
    while True:
        left: dict[str, set[ProcessId]] = {}
        for child in children:
            if child.name not in swept and child.proc.poll() is not None:
                swept.add(child.name)
                _signal_all(child, signal.SIGTERM, remaining(child))
            left[child.name] = remaining(child)
        if not any(left.values()) or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    killed = [c for c in children if left[c.name]]
    for child in killed:
        child.killed_commands = [_command(pid) for pid, _ in sorted(left[child.name])]
        _signal_all(child, signal.SIGKILL, left[child.name])
        child.stopped_by = "SIGKILL"
    deadline = time.monotonic() + 5.0
    while any(remaining(c) for c in killed) and time.monotonic() < deadline:
        time.sleep(0.05)
    for child in children:
        try:
            child.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
    return [c.name for c in killed]


def port_in_use(host: str, port: int) -> bool:
    """Would binding host:port fail (something already listens there)?"""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn and Dagster bind
        try:
            sock.bind((host.strip("[]"), port))
        except OSError:
            return True
    return False
