"""What a training process holds while it runs: the run-directory lock and the stop signals.

- `RunLock`: an OS file lock (`fcntl.flock`) on `<run_dir>/.lock.<rank>`, one per process rank.
  The kernel releases it when the process ends, however it ends, so a kill -9 leaves no stale lock.
  The holder writes its PID and host into the file, so a second run can say who holds it.
- `write_atomically`, `make_dirs`: files and directories of the run, each failure one line.
- `StopSignals`: SIGTERM or SIGINT ask the loop to stop after the step it is in; the loop then
  saves that step and waits until the checkpoint is durable. A second SIGINT aborts at once.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import sys
from pathlib import Path

from jax_mmdit.errors import UserError


class RunLock:
    """`with RunLock(run_dir, rank):` holds the lock, or raises UserError naming the holder."""

    def __init__(self, run_dir: str | os.PathLike, rank: int = 0):
        self.path = Path(run_dir) / f".lock.{rank}"
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"Cannot write to the run directory {self.path.parent}: {e.strerror}.") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise UserError(
                f"The run directory {self.path.parent} is in use by another training process ({holder}); "
                "wait for it to finish, stop it, or pick another --run_dir."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096) or b"{}")
        return f"PID {info.get('pid', '?')} on host {info.get('host', '?')}"
    except (OSError, ValueError):
        return "PID unknown"


class StopSignals:
    """`with StopSignals() as stop:` ... `if stop.requested:`; handlers restored on exit. Outside the
    main thread (a notebook worker) signals cannot be caught: `requested` stays False."""

    def __init__(self):
        self.requested = False
        self._old: dict = {}

    def _handler(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: abort without waiting for the save
        self.requested = True
        print(f"\n[mmdit] {signal.Signals(signum).name}: stopping after this step and saving it "
              "(Ctrl-C again aborts without saving).", file=sys.stderr, flush=True)  # fmt: skip

    def __enter__(self) -> StopSignals:
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handler)
        except ValueError:  # not the main thread
            pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to a temporary name, then rename: a reader never sees half a file."""
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"Cannot write {path}: {e.strerror}.") from None


def make_dirs(*dirs: Path) -> None:
    for d in dirs:
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"Cannot create {d}: {e.strerror}.") from None
