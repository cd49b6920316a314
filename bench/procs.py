"""Starting and cleaning up the benchmark's processes, and reading their peak memory."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


class Processes:
    """Every process the benchmark starts, each in its own session, killed as a group at the end.

    ``stop_all`` runs from a ``finally`` (also on Ctrl-C and SIGTERM) so nothing outlives a run.
    """

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []

    def start(
        self,
        args: Sequence[str],
        *,
        log: Path | None = None,
        env: dict[str, str] | None = None,
        cwd: Path = REPO,
    ) -> subprocess.Popen[bytes]:
        """Start ``args`` in a new session; output goes to ``log`` (or nowhere)."""
        full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        out = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115
        try:
            proc = subprocess.Popen(
                list(args),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=full_env,
                cwd=cwd,
                start_new_session=True,
            )
        finally:
            if not isinstance(out, int):
                out.close()
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout_s: float = 15) -> None:
        """SIGTERM the process group, SIGKILL it when it does not end in time."""
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout_s)
        # Children (a prefork pool) may outlive their parent for a moment: kill what is left.
        _signal_group(proc, signal.SIGKILL)
        if proc.poll() is None:
            proc.wait()
        if proc in self._procs:
            self._procs.remove(proc)

    def stop_all(self) -> None:
        """Stop everything still registered, newest first."""
        for proc in reversed(list(self._procs)):
            with contextlib.suppress(OSError):
                self.stop(proc, timeout_s=5)
        self._procs.clear()


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def children_of(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (from /proc)."""
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may hold spaces: parse after the last ')'.
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            found.append(int(entry))
    return found


def peak_rss_mb(pid: int) -> float | None:
    """VmHWM (peak resident set size) of ``pid`` in MB, or None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def worker_peak_rss(pid: int) -> tuple[float | None, float | None]:
    """Peak RSS in MB of a worker's main process and the largest of its child processes."""
    main = peak_rss_mb(pid)
    kids = [r for c in children_of(pid) if (r := peak_rss_mb(c)) is not None]
    return main, (max(kids) if kids else None)


def wait_for_log(path: Path, text: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Until ``text`` appears in the log at ``path``; raises when the process ends or time is up."""
    deadline = time.monotonic() + timeout_s
    while True:
        content = path.read_text(errors="replace") if path.exists() else ""
        if text in content:
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}:\n{content[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args!r} not ready after {timeout_s:g} s:\n{content[-3000:]}")
        time.sleep(0.05)
