"""The sweep's response cache as a service, for cells that run on other machines.

Why: a sweep pays for each teacher answer once because its cells share one response cache
(:class:`qbudget.ledger.ResponseCache`, a SQLite file) and *claim* a prompt before paying
for it. SQLite is only safe on a local disk, and the cells of a Ray sweep run on nodes
that do not see the driver's disk. So one process next to the file owns it --
:class:`SweepService`, a Ray actor pinned to the driver's node -- and every cell reaches it
through :class:`RemoteResponseCache`, which has the methods a
:class:`qbudget.ledger.Ledger` calls on its cache (``get_many``, ``put_many``, ``claim``,
``release``). The ledger itself is unchanged and stays per run, node-local: q <= budget,
a prompt is never paid twice in a run, a failed call is never charged.

Claims on one machine are presumed dead when their process is gone (the ledger checks the
pid). A claim made on another machine carries no pid this host can check; the ledger
alone would wait 30 minutes before taking it over. The service does better: each remote
buyer renews a lease every ``HEARTBEAT_S`` seconds while it lives, and claims of a buyer
whose lease is older than ``LEASE_S`` (its node died, its process was killed) are
released, so a cell retried on another node waits at most that long.

The service also carries the cells' progress events to the driver (``progress`` /
``drain``): remote processes cannot reach the driver's display any other way.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
import time
from typing import Sequence

#: a remote buyer whose lease is older than this is presumed dead (its claims are freed)
LEASE_S = 60.0
#: how often a live remote buyer renews its lease
HEARTBEAT_S = 10.0


class SweepService:
    """Owns the sweep's ``responses.sqlite`` and the progress inbox (run as a Ray actor).

    Calls are served one at a time (an actor's default), so the SQLite file has a single
    writer process and every operation keeps the ResponseCache's transactional meaning.
    """

    def __init__(self, cache_path: str):
        from qbudget.ledger import ResponseCache

        self.cache = ResponseCache(cache_path)
        self.host = socket.gethostname()
        self._peek = sqlite3.connect(str(self.cache.path), timeout=120)   # reads claims only
        self._seen: dict[tuple[str, str], float] = {}
        self._last_expiry = 0.0
        self._inbox: list = []

    # -- the ResponseCache operations a Ledger uses ----------------------------------------
    def get_many(self, fingerprint: str, texts: Sequence[str], sample: int = 0) -> dict[int, str]:
        return self.cache.get_many(fingerprint, texts, sample)

    def put_many(self, fingerprint: str, items: Sequence[tuple[str, str]], sample: int = 0) -> None:
        self.cache.put_many(fingerprint, items, sample)

    def claim(self, fingerprint: str, shas: Sequence[str], sample: int, owner: str):
        self._renew(owner)
        self._expire()
        return self.cache.claim(fingerprint, shas, sample, owner)

    def release(self, owner: str) -> None:
        self.cache.release(owner)

    def size(self) -> int:
        return len(self.cache)

    # -- leases of remote buyers -----------------------------------------------------------
    def heartbeat(self, host: str, pid: int) -> None:
        self._seen[(host, str(pid))] = time.time()

    def _renew(self, owner: str) -> None:
        host, pid, _ = (owner or "::").split(":", 2)
        self._seen[(host, pid)] = time.time()

    def _expire(self) -> None:
        """Release the claims of remote buyers whose lease ran out (at most every 2 s)."""
        now = time.time()
        if now - self._last_expiry < 2.0:
            return
        self._last_expiry = now
        owners = [r[0] for r in self._peek.execute("SELECT DISTINCT owner FROM claims")]
        self._peek.commit()   # end the read transaction: keep the WAL checkpointable
        for owner in owners:
            host, pid, _ = (owner or "::").split(":", 2)
            if host == self.host:
                continue                      # same machine: the ledger checks the pid
            # first sight (e.g. after a restart of this service): start the lease now
            last = self._seen.setdefault((host, pid), now)
            if now - last > LEASE_S:
                self.cache.release(owner)

    # -- progress of remote cells ----------------------------------------------------------
    def progress(self, item) -> None:
        self._inbox.append(item)

    def drain(self) -> list:
        items, self._inbox = self._inbox, []
        return items

    def close(self) -> None:
        self._peek.close()
        self.cache.close()


def wait_for(ref):
    """The value of ``ref``, waited for without telling Ray this task is blocked.

    Why: a task blocked in ``ray.get`` hands its CPUs back to the node, which then starts
    the next queued cell beside it in a fresh worker -- two cells on a 1-CPU node, each
    compiling its own functions. A cell waiting a few milliseconds for the cache service
    is not idle, so it keeps its CPUs: the wait goes through the reference's future.
    """
    return ref.future().result()


class RemoteResponseCache:
    """What a cell's Ledger uses as its shared cache when the file is on another machine.

    Every method is one call to the :class:`SweepService` actor; a daemon thread renews
    this process's lease while the cell runs (see the module docstring).
    """

    def __init__(self, service, label: str = "sweep cache service"):
        self._svc, self.label = service, label
        self._ident = (socket.gethostname(), os.getpid())
        wait_for(service.heartbeat.remote(*self._ident))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="qbudget-cache-lease",
                                        daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._svc.heartbeat.remote(*self._ident)
            except Exception:   # the sweep is ending; the next real call reports any problem
                return

    def _call(self, method: str, *args):
        return wait_for(getattr(self._svc, method).remote(*args))

    def get_many(self, fingerprint: str, texts: Sequence[str], sample: int = 0) -> dict[int, str]:
        return self._call("get_many", fingerprint, list(texts), sample)

    def put_many(self, fingerprint: str, items: Sequence[tuple[str, str]], sample: int = 0) -> None:
        if items:
            self._call("put_many", fingerprint, list(items), sample)

    def claim(self, fingerprint: str, shas: Sequence[str], sample: int,
              owner: str) -> tuple[dict[str, str], list[str]]:
        answered, mine = self._call("claim", fingerprint, list(shas), sample, owner)
        return answered, mine

    def release(self, owner: str) -> None:
        self._call("release", owner)

    def __len__(self) -> int:
        return self._call("size")

    def __bool__(self) -> bool:   # an empty cache is still a cache
        return True

    def __str__(self) -> str:
        return self.label

    def close(self) -> None:
        self._stop.set()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
