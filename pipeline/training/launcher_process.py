"""Run a launcher (torchrun / deepspeed) as its own process group: echo the ranks' output, keep its tail, and end
the whole group at a deadline or when the caller is interrupted (e.g. by pytest-timeout), so no rank outlives it."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading


class LaunchTimedOut(RuntimeError):
    """The launcher's ranks had not all exited by the deadline; the group was killed."""


class LauncherProcess:
    """``run()`` the command; ``tail()`` is the last ``keep`` lines the ranks printed (stdout and stderr together)."""

    def __init__(self, cmd: list[str], env: dict, keep: int = 40):
        self.cmd, self.env = cmd, env
        self.lines = collections.deque(maxlen=keep)

    def run(self, timeout_s: float | None) -> int:
        """The launcher's exit code; ``LaunchTimedOut`` after ``timeout_s`` seconds (None = no limit)."""
        proc = subprocess.Popen(self.cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        echo = threading.Thread(target=self._echo, args=(proc.stdout,), daemon=True)
        echo.start()
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self._end_group(proc)
            echo.join(timeout=5)
            raise LaunchTimedOut(f"ranks still running after {timeout_s} s") from None
        except BaseException:  # interrupted (Ctrl-C, a test's timeout): take the ranks down too
            self._end_group(proc)
            raise
        echo.join(timeout=5)  # ranks may have left children holding the pipe: do not wait for them forever
        return rc

    def tail(self) -> str:
        return "".join(self.lines)

    def _echo(self, stream) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace")
            self.lines.append(line)
            sys.stdout.write(line)
            sys.stdout.flush()
        stream.close()

    @staticmethod
    def _end_group(proc: subprocess.Popen) -> None:
        """SIGTERM to the launcher's process group (its ranks), SIGKILL to what is left after 10 s."""
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                continue
            try:  # the launcher is gone; its ranks may not be
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
