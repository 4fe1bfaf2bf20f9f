"""The lease lock of a run directory: one process at a time writes a run, across hosts (RunLock, the
file run_dir/.lock; read_lock and live_lock_owner read it). Standard library only; rundir.py's
exclusive_run holds it around a run.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

# A run directory's lock is a lease: its owner refreshes the lock file's mtime every HEARTBEAT_SECONDS
# (at most a fifth of the lease), and a lock not refreshed for LEASE_SECONDS is stale and may be taken
# over from any host. The lease must outlast the longest stall of a live owner (a slow file system,
# a suspended job): a live run whose lock is taken over notices it at its next refresh and stops.
LEASE_SECONDS = 300.0
HEARTBEAT_SECONDS = 60.0


class RunLocked(Exception):
    """Another live process holds the run's lock."""


class LockLost(Exception):
    """This process no longer holds its run's lock (deleted, or taken over after a stall): it stops
    before writing anything more; train.py exits with code 3."""


class LockUnusable(Exception):
    """The lock file cannot be made: a folder stands where it goes (folder=True), or this user cannot
    write beside it (folder=False). path: the lock file's path. rundir.exclusive_run turns it into a
    rundir.RunDirError naming the fix."""

    def __init__(self, path: str, folder: bool):
        super().__init__(f"{path} is a folder, not a lock file" if folder else f"cannot write {os.path.dirname(path)}")
        self.path, self.folder = path, folder


@dataclass(frozen=True)
class LockOwner:
    """What a lock file says about its holder, and how long ago it was last refreshed."""
    host: str
    pid: int
    since: str          # when it took the lock, UTC (ISO 8601); "?" for a lock in the older 'host pid' form
    pid_ns: str | None  # its PID namespace ('pid:[4026531836]'), None when unknown
    age: float          # seconds since the lock file's mtime, by the clock given to read_lock

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} since {self.since}, refreshed {max(self.age, 0):.0f} s ago"

    def is_live(self) -> bool:
        """Refreshed within the lease, unless it names a process of this host's PID namespace that is gone
        (a local crash is then taken over at once; other hosts' runs wait for their lease to run out)."""
        if self.age >= LEASE_SECONDS:
            return False
        same_namespace = self.pid_ns is None or self.pid_ns == _pid_namespace()
        return not (self.host == socket.gethostname() and same_namespace and not _pid_exists(self.pid))


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_lock(path: str, now: float | None = None) -> tuple[LockOwner | None, int | None]:
    """(the owner named by the lock file, or None if it cannot be parsed; its inode, or None if there
    is no lock). `now` is the clock its age is measured against (default: this host's time)."""
    try:
        with open(path) as f:
            text = f.read()
            inode, mtime = os.fstat(f.fileno()).st_ino, os.fstat(f.fileno()).st_mtime
    except FileNotFoundError:
        return None, None
    except OSError:
        return None, -1
    age = (time.time() if now is None else now) - mtime
    try:
        if text.startswith("{"):
            d = json.loads(text)
            return LockOwner(str(d["host"]), int(d["pid"]), str(d["since"]), d.get("pid_ns"), age), inode
        host, pid = text.split()
        return LockOwner(host, int(pid), "?", None, age), inode
    except (ValueError, KeyError, TypeError):
        return None, inode  # not a lock this code wrote: never taken for a live one


def live_lock_owner(run_dir: str) -> LockOwner | None:
    """The live holder of run_dir's lock, or None (no lock, or a stale or unreadable one). Reads only."""
    owner, _ = read_lock(os.path.join(run_dir, ".lock"))
    return owner if owner is not None and owner.is_live() else None


class RunLock:
    """An exclusive, cross-host lock on a run directory: the file run_dir/.lock, one line of JSON
    naming its holder (host, pid, since when), kept fresh by a daemon thread (see LEASE_SECONDS).

    on_lost: called from that thread if the lock was deleted or taken over (this process had stalled
    for longer than the lease), unless confirm() noticed it first; the caller should stop writing to
    the run directory. confirm() raises LockLost then: the run directory's writes call it first.
    """

    def __init__(self, run_dir: str, on_lost: Callable[[], None] | None = None):
        self.path = os.path.join(run_dir, ".lock")
        self.on_lost = on_lost
        self.held = False
        self.inode: int | None = None
        self.text = ""
        self.lost = False
        self._lost_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Takes the lock or raises RunLocked (naming the holder).

        The lock is written in full beside its place and hard-linked there (atomic, fails if a lock
        exists), so a lock file always names its owner. A stale lock is first renamed aside (only one
        contender's rename succeeds); if what was renamed turns out to be a fresh lock, linked in the
        meantime by another contender, it is linked back and this contender gives up.
        """
        host, pid = socket.gethostname(), os.getpid()
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        mine = f"{self.path}.{host}.{pid}"
        self.text = json.dumps({"host": host, "pid": pid, "since": since, "pid_ns": _pid_namespace()}) + "\n"
        if os.path.isdir(self.path):
            raise LockUnusable(self.path, folder=True)
        try:
            try:
                with open(mine, "w") as f:
                    f.write(self.text)
            except PermissionError:
                raise LockUnusable(self.path, folder=False) from None
            for _ in range(3):
                try:
                    os.link(mine, self.path)
                except FileExistsError:
                    # the age is measured against our own file's mtime: the file server's clock, not this host's
                    owner, inode = read_lock(self.path, now=os.stat(mine).st_mtime)
                    if owner is not None and owner.is_live():
                        raise RunLocked(owner.describe()) from None
                    if inode == -1:
                        raise RunLocked(f"its lock {self.path} exists but this user cannot read it") from None
                    if inode is not None:
                        self._set_aside(inode, f"{self.path}.stale.{host}.{pid}")
                    continue
                self.inode = os.stat(self.path).st_ino
                self.held = True
                self._start_heartbeat()
                return
            raise RunLocked("other processes were taking the lock at the same moment")
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(mine)  # also when writing it failed (a full disk): no empty lock file is left

    def _set_aside(self, stale_inode: int, aside: str) -> None:
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another contender moved it first
        try:
            if os.stat(aside).st_ino != stale_inode:  # a fresh lock replaced the stale one meanwhile
                with contextlib.suppress(FileExistsError):
                    os.link(aside, self.path)
        finally:
            os.remove(aside)

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        interval = min(HEARTBEAT_SECONDS, LEASE_SECONDS / 5)
        while not self._stop.wait(interval):
            try:
                if not self._is_mine():
                    raise FileNotFoundError(self.path)
                os.utime(self.path)
            except FileNotFoundError:
                if self._stop.is_set():
                    return
                if self._mark_lost() and self.on_lost is not None:
                    self.on_lost()
                return
            except OSError:
                continue  # a passing file-system error: the next beat tries again

    def _mark_lost(self) -> bool:
        """Records that the lock is no longer this process's; True for the first caller only."""
        with self._lost_lock:
            first = not self.lost
            self.lost, self.held = True, False
            return first

    def lost_message(self) -> str:
        return (f"the lock {self.path} is no longer this process's (deleted or taken over); stopping without "
                "writing; relaunch to resume")

    def confirm(self) -> None:
        """Raises LockLost unless the lock file is still the one this process linked (one open and read
        of the lock file: cheap enough before every write)."""
        if not self.lost:
            try:
                if self.held and self._is_mine():
                    return
            except OSError:
                pass
            self._mark_lost()
        raise LockLost(self.lost_message())

    def release(self) -> None:
        """Stops the refreshing and removes the lock if it is still this process's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                if self._is_mine():
                    os.remove(self.path)
            self.held = False

    def _is_mine(self) -> bool:
        """The lock file is the one this process linked: same inode and same text (inodes are reused)."""
        with open(self.path) as f:
            return os.fstat(f.fileno()).st_ino == self.inode and f.read() == self.text
