"""The run's own log, `OUTPUT_DIR/train.log`: what the run prints (stdout, stderr, warnings, the progress bar) is
also appended there, however the run was started (a terminal, the web page, a script), so the web page and a
later reader see it. A progress bar's carriage-return updates are folded: the file gets each finished line and,
while a bar is moving, its state at most every `PROGRESS_EVERY_S` seconds, so a long run's log stays small.
Only the main process writes it; a new start of the same run appends, under a `$ amused-tune ...` line."""

from __future__ import annotations

import logging
import os
import shlex
import sys
import time
from pathlib import Path

RUN_LOG = "train.log"
PROGRESS_EVERY_S = 10.0


def command_line(argv: list[str] | None = None) -> str:
    """The command that started this process as a user would type it (`amused-tune ...`), or what called train()."""
    if argv is not None:
        return shlex.join(["amused-tune", *argv])
    program = sys.argv[0] if sys.argv else ""
    if Path(program).name == "amused-tune" or program.endswith(os.path.join("amused_tune", "cli", "__main__.py")):
        return shlex.join(["amused-tune", *sys.argv[1:]])
    return f"train() called from {Path(program).name or 'python'}"


class _Tee:
    """A text stream that writes to `stream` and hands the same text to `log`."""

    def __init__(self, stream, log: "RunLog"):
        self._stream, self._log = stream, log

    def write(self, text: str) -> int:
        self._log.feed(text)
        return self._stream.write(text)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding ... of the terminal's stream
        return getattr(self._stream, name)


class RunLog:
    """`start()` tees sys.stdout, sys.stderr and the logging handlers that write to them into OUTPUT_DIR/train.log;
    `close()` puts them back."""

    def __init__(self, out: Path):
        self.path = Path(out) / RUN_LOG
        self._file = None
        self._pending = ""  # the unfinished line (a progress bar's latest state)
        self._progress_at = 0.0
        self._saved: list = []

    def start(self, argv: list[str] | None = None) -> "RunLog":
        if self._file is not None:
            return self
        try:
            self._file = open(self.path, "a", encoding="utf-8", errors="replace")
        except OSError:  # a run that cannot write its log still trains (its folder's problems are said elsewhere)
            return self
        self._file.write(f"\n$ {command_line(argv)}    # {time.strftime('%Y-%m-%d %H:%M:%S')}, pid {os.getpid()}\n")
        self._file.flush()
        old_out, old_err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(old_out, self), _Tee(old_err, self)
        self._saved = [("sys", old_out, old_err)]
        for handler in logging.getLogger().handlers:
            stream = getattr(handler, "stream", None)
            if isinstance(handler, logging.StreamHandler) and stream in (old_out, old_err):
                handler.setStream(sys.stdout if stream is old_out else sys.stderr)
                self._saved.append((handler, stream))
        return self

    def feed(self, text: str) -> None:
        if self._file is None or not text:
            return
        lines = (self._pending + text).split("\n")
        done, self._pending = lines[:-1], lines[-1]
        try:
            for line in done:
                self._file.write(line.split("\r")[-1] + "\n")  # a bar's last state before its newline
            now = time.monotonic()
            if done:
                self._progress_at = now
            elif "\r" in text and now - self._progress_at >= PROGRESS_EVERY_S and self._pending.split("\r")[-1]:
                self._file.write(self._pending.split("\r")[-1] + "\n")
                self._progress_at = now
            self._file.flush()
        except OSError:  # a full disk: the run's own error handling says so; the log stops quietly
            self._close_file()

    def line(self, text: str) -> None:
        """A line for the log only (not the terminal), e.g. how the run ended."""
        self.feed_pending()
        if self._file is not None:
            try:
                self._file.write(text.rstrip("\n") + "\n")
                self._file.flush()
            except OSError:
                self._close_file()

    def feed_pending(self) -> None:
        if self._file is not None and self._pending.split("\r")[-1].strip():
            self.feed("\n")
        self._pending = ""

    def close(self) -> None:
        for saved in self._saved:
            if saved[0] == "sys":  # put back only what is still ours (a caller may have swapped them since)
                if isinstance(sys.stdout, _Tee) and sys.stdout._log is self:
                    sys.stdout = saved[1]
                if isinstance(sys.stderr, _Tee) and sys.stderr._log is self:
                    sys.stderr = saved[2]
            elif isinstance(saved[0].stream, _Tee) and saved[0].stream._log is self:
                saved[0].setStream(saved[1])
        self._saved = []
        self.feed_pending()
        self._close_file()

    def _close_file(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
        self._file = None
