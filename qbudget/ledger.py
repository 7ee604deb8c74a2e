"""The budget ledger and the response cache: SQLite (stdlib, WAL), durable and atomic.

Every teacher answer costs money, so the bookkeeping must survive a crash, a flaky endpoint
and concurrent buyers:

``ResponseCache``
    answers keyed by (oracle fingerprint, sha256 of the prompt text, sample), shared between
    runs, sweep cells and processes: a second strategy or seed replaying a prompt pays once.
    Buyers *claim* the texts they are about to pay for, so two cells wanting the same
    prompt at the same moment pay once: the second waits for the first one's answer (a
    claim whose owner died is taken over).

``Ledger``
    one per run. ``buy`` first *reserves* budget in a ``BEGIN IMMEDIATE`` transaction (so q
    never exceeds the budget, whatever threads or processes buy concurrently), then gets the
    answers -- from the run's own store, else the shared cache, else the oracle -- and commits
    the purchase before returning. A failed oracle call rolls the reservation back: it is
    never charged. Answers that did arrive before a failure are kept (and counted as paid)
    so a retry does not pay for them again. A process killed mid-purchase leaves only a
    reservation owned by a dead process, which the next opener removes: reopening the file
    resumes the run.

Two counts: ``q``, the training queries the run consumed (the x axis of every curve), and
``paid``, the oracle calls this run actually made for them. Evaluation (probe) answers go
through the same store and cache but are counted apart (``eval_paid``) and never touch q.

Spend in three units. Every answer carries its token usage
(:class:`qbudget.oracles.usage.Usage`: the endpoint's count, the teacher tokenizer's, a
recording's, or an estimate, marked so) and its cost at the run's :class:`Price`. The
budget caps training purchases in queries (``budget``) and optionally in tokens and
dollars (:class:`Caps`); whichever is reached first stops buying. Before a request is
sent its *worst case* (prompt tokens plus the ``max_tokens`` it asks for) is reserved
under every cap in the same transaction as the query, so concurrent buyers can never
overrun one; when the answer arrives the reservation is settled at the real usage. A
request whose worst case does not fit is not sent. Evaluation answers are the ``eval``
account: reported apart and capped by ``Caps.eval_usd``, reserved the same way chunk by
chunk. Budgets count what the run *consumed* (an answer served from the shared cache costs
the run what it would have cost alone, so a simulated study's curve does not depend on
which cell ran first); ``paid_usd`` is the bill this run actually caused.

A prompt already bought in this run is refused (QBudgetError) rather than silently served:
the loop never asks twice, so a repeat means a bug or a resume that forgot ``bought()``.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from dataclasses import dataclass

from qbudget.errors import QBudgetError
from qbudget.oracles.base import Oracle, OracleCallError, prompt_hash
from qbudget.oracles.usage import Price, Usage, answer_with_usage, estimate_tokens, worst_case
from qbudget.pool import Prompt

_HOST = socket.gethostname()
_SQL_CHUNK = 500  # stay well under SQLite's bound-parameter limit


def _chunks(seq: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(seq), size):
        yield seq[i:i + size]


class _Db:
    """One SQLite file, one connection per thread (and per process after a fork)."""

    def __init__(self, path: str | Path, schema: str):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_file():
            raise QBudgetError(f"{self.path} exists and is not a file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._schema = schema
        self._local = threading.local()
        self._all: list[tuple[int, sqlite3.Connection]] = []
        self._lock = threading.Lock()
        with self.tx() as con:
            for stmt in filter(str.strip, schema.split(";")):
                con.execute(stmt)

    def add_columns(self, table: str, columns: dict[str, str]) -> None:
        """Add ``columns`` (name -> SQL type) missing from ``table`` (files made before them)."""
        with self.tx() as con:
            have = {row[1] for row in con.execute(f"PRAGMA table_info({table})")}
            for name, kind in columns.items():
                if name not in have:
                    con.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")

    def conn(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None or self._local.pid != os.getpid():
            try:
                # check_same_thread=False only so close() can close every thread's
                # connection; each connection is still used by its own thread alone
                con = sqlite3.connect(self.path, timeout=120, isolation_level=None,
                                      check_same_thread=False)
                mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                con.execute("PRAGMA synchronous=FULL")
                con.execute("PRAGMA busy_timeout=120000")
            except sqlite3.DatabaseError as exc:
                raise QBudgetError(f"{self.path}: not a usable SQLite database ({exc})") from None
            if mode.lower() != "wal":
                raise QBudgetError(f"{self.path}: cannot switch to WAL journal mode ({mode})")
            self._local.con, self._local.pid = con, os.getpid()
            with self._lock:
                self._all.append((os.getpid(), con))
        return con

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that takes the database's write lock up front."""
        con = self.conn()
        try:
            con.execute("BEGIN IMMEDIATE")
        except sqlite3.DatabaseError as exc:
            raise QBudgetError(f"{self.path}: not a usable SQLite database ({exc})") from None
        try:
            yield con
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            for pid, con in self._all:
                if pid != os.getpid():  # a forked child must not touch its parent's handles
                    continue
                try:
                    con.close()
                except sqlite3.Error:  # pragma: no cover - already closed
                    pass
            self._all.clear()
        self._local = threading.local()


class _Store:
    """Owns one :class:`_Db` (schema ``SCHEMA``); closed by :meth:`close` or ``with``."""

    SCHEMA: str   # the CREATE statements, set by each subclass

    def __init__(self, path: str | Path):
        self._db = _Db(path, self.SCHEMA)
        self.path = self._db.path

    def close(self) -> None:
        self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ResponseCache(_Store):
    """Answers shared across runs and processes, keyed (fingerprint, sha256(text), sample)."""

    SCHEMA = """
    CREATE TABLE IF NOT EXISTS responses (
        fingerprint TEXT NOT NULL, prompt_sha TEXT NOT NULL, sample INTEGER NOT NULL,
        response TEXT NOT NULL, PRIMARY KEY (fingerprint, prompt_sha, sample)
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS claims (
        fingerprint TEXT NOT NULL, prompt_sha TEXT NOT NULL, sample INTEGER NOT NULL,
        owner TEXT NOT NULL, claimed_at REAL NOT NULL,
        PRIMARY KEY (fingerprint, prompt_sha, sample)
    ) WITHOUT ROWID
    """

    #: usage of each answer (null in files written before usage was recorded)
    USAGE_COLUMNS = {"prompt_tokens": "INTEGER", "completion_tokens": "INTEGER",
                     "usage_source": "TEXT", "usage_usd": "REAL"}

    def __init__(self, path: str | Path):
        super().__init__(path)
        self._db.add_columns("responses", self.USAGE_COLUMNS)

    def get_many(self, fingerprint: str, texts: Sequence[str], sample: int = 0) -> dict[int, str]:
        """Cached answers for ``texts``: {position: response} for the hits only."""
        shas = [prompt_hash(t) for t in texts]
        found: dict[str, str] = {}
        con = self._db.conn()
        for part in _chunks(sorted(set(shas)), _SQL_CHUNK):
            marks = ",".join("?" * len(part))
            for sha, resp in con.execute(
                    f"SELECT prompt_sha, response FROM responses WHERE fingerprint=? AND sample=? "
                    f"AND prompt_sha IN ({marks})", (fingerprint, sample, *part)):
                found[sha] = resp
        return {i: found[s] for i, s in enumerate(shas) if s in found}

    def put_many(self, fingerprint: str, items: Sequence[tuple], sample: int = 0) -> None:
        """Store (prompt text, response[, Usage]) items; the first answer stored for a key wins."""
        if not items:
            return
        with self._db.tx() as con:
            con.executemany(
                "INSERT OR IGNORE INTO responses (fingerprint, prompt_sha, sample, response, "
                "prompt_tokens, completion_tokens, usage_source, usage_usd) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(fingerprint, prompt_hash(item[0]), sample, item[1],
                  *_usage_row(item[2] if len(item) > 2 else None)) for item in items])

    def __len__(self) -> int:
        return self._db.conn().execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def claim(self, fingerprint: str, shas: Sequence[str], sample: int,
              owner: str) -> tuple[dict[str, tuple[str, Usage | None]], list[str]]:
        """Claim the right to pay for the answers of ``shas`` (prompt hashes).

        Why: buyers that share this cache (the cells of a sweep, in other processes) may
        want the same prompt at the same moment; without a claim both would miss the cache
        and both pay. Returns ``(answered, mine)``: answers already in the cache, and the
        hashes this ``owner`` now holds and must buy (then :meth:`release`); an answer comes
        with its recorded usage (None for answers stored before usage was). The rest are
        held by another live buyer: wait for its answers and claim again. A claim whose
        owner died (this host: its process is gone; another host: older than
        ``_FOREIGN_CLAIM_S``) is taken over.
        """
        shas = list(dict.fromkeys(shas))   # mine keeps this order: the order they are paid in
        answered: dict[str, tuple[str, Usage | None]] = {}
        mine: list[str] = []
        now = time.time()
        with self._db.tx() as con:
            for part in _chunks(shas, _SQL_CHUNK):
                marks = ",".join("?" * len(part))
                for sha, resp, *usage in con.execute(
                        f"SELECT prompt_sha, response, prompt_tokens, completion_tokens, "
                        f"usage_source, usage_usd FROM responses WHERE fingerprint=? AND "
                        f"sample=? AND prompt_sha IN ({marks})", (fingerprint, sample, *part)):
                    answered[sha] = (resp, _usage_from_row(*usage))
                held = dict(((sha, (who, at)) for sha, who, at in con.execute(
                    f"SELECT prompt_sha, owner, claimed_at FROM claims WHERE fingerprint=? "
                    f"AND sample=? AND prompt_sha IN ({marks})", (fingerprint, sample, *part))))
                for sha in part:
                    if sha in answered:
                        continue
                    who, at = held.get(sha, (None, 0.0))
                    if who is None or who == owner or not _owner_alive(who, now - at):
                        con.execute("INSERT OR REPLACE INTO claims VALUES (?, ?, ?, ?, ?)",
                                    (fingerprint, sha, sample, owner, now))
                        mine.append(sha)
        return answered, mine

    def release(self, owner: str) -> None:
        """Drop every claim ``owner`` holds (its answers are stored, or it failed)."""
        with self._db.tx() as con:
            con.execute("DELETE FROM claims WHERE owner=?", (owner,))


def _usage_row(usage: Usage | None) -> tuple:
    """A Usage as its four SQL columns (all null when unknown)."""
    if usage is None:
        return (None, None, None, None)
    return (usage.prompt_tokens, usage.completion_tokens, usage.source, usage.usd)


def _usage_from_row(prompt_tokens, completion_tokens, source, usd) -> Usage | None:
    if prompt_tokens is None or completion_tokens is None or source is None:
        return None
    return Usage(int(prompt_tokens), int(completion_tokens), str(source),
                 None if usd is None else float(usd))


def _estimated(text: str, response: str) -> Usage:
    """The usage of an answer stored before usage was recorded: an estimate, marked so."""
    return Usage(estimate_tokens(text), estimate_tokens(response), "estimate")


@dataclass(frozen=True)
class Caps:
    """Limits beyond the query budget: training tokens and dollars, evaluation dollars.

    None = no limit in that unit. Dollars need a :class:`Price` (or answers that carry
    their own cost).
    """

    tokens: int | None = None
    usd: float | None = None
    eval_usd: float | None = None

    def __post_init__(self):
        if self.tokens is not None and (isinstance(self.tokens, bool)
                                        or not isinstance(self.tokens, int) or self.tokens < 0):
            raise QBudgetError(f"budget.tokens must be an integer >= 0, got {self.tokens!r}")
        for name in ("usd", "eval_usd"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                  or not v >= 0):
                raise QBudgetError(f"budget.{name} must be a number >= 0, got {v!r}")

    @property
    def train_capped(self) -> bool:
        return self.tokens is not None or self.usd is not None


#: a claim by a buyer on another host is presumed dead after this long (no pid to check)
_FOREIGN_CLAIM_S = 1800.0
#: how often a buyer waiting for another buyer's answers looks in the cache again
_CLAIM_POLL_S = 0.1


def _owner_alive(owner: str, age: float) -> bool:
    """Whether the buyer ``host:pid:token`` may still be paying for its claim."""
    host, pid, _ = (owner or "::").split(":", 2)
    if host == _HOST and pid.isdigit():
        return int(pid) == os.getpid() or _pid_alive(int(pid))
    return age < _FOREIGN_CLAIM_S


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed but not yet reaped child is a zombie: it will never finish its purchase
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


class Ledger(_Store):
    """One run's budget and purchases (see the module docstring for the guarantees)."""

    SCHEMA = """
    CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS purchases (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        prompt_id TEXT NOT NULL UNIQUE,
        prompt_text TEXT NOT NULL,
        response TEXT,
        state TEXT NOT NULL CHECK (state IN ('reserved', 'bought')),
        owner TEXT
    );
    CREATE TABLE IF NOT EXISTS answers (
        fingerprint TEXT NOT NULL, prompt_sha TEXT NOT NULL, sample INTEGER NOT NULL,
        response TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('train', 'eval')),
        paid INTEGER NOT NULL,
        PRIMARY KEY (fingerprint, prompt_sha, sample)
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS eval_holds (owner TEXT PRIMARY KEY, usd REAL NOT NULL)
    """
    #: a purchase: the answer's usage and cost once bought, the worst case while reserved
    PURCHASE_COLUMNS = {"prompt_tokens": "INTEGER", "completion_tokens": "INTEGER",
                        "usage_source": "TEXT", "usd": "REAL",
                        "reserve_tokens": "INTEGER", "reserve_usd": "REAL"}
    #: a stored answer: its usage and its cost at the run's price
    ANSWER_COLUMNS = {"prompt_tokens": "INTEGER", "completion_tokens": "INTEGER",
                      "usage_source": "TEXT", "usage_usd": "REAL", "usd": "REAL"}

    def __init__(self, path: str | Path, budget: int, cache: ResponseCache | None = None, *,
                 caps: Caps | None = None, price: Price | None = None):
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
            raise QBudgetError(f"budget must be a non-negative integer, got {budget!r}")
        super().__init__(path)
        self._db.add_columns("purchases", self.PURCHASE_COLUMNS)
        self._db.add_columns("answers", self.ANSWER_COLUMNS)
        self._budget = budget
        self.cache = cache
        with self._db.tx() as con:
            self._caps = self._fixed(con, "caps", caps, Caps(),
                                     lambda c: json.dumps([c.tokens, c.usd, c.eval_usd]),
                                     lambda t: Caps(*json.loads(t)))
            self._price = self._fixed(con, "price", price, Price(),
                                      lambda p: json.dumps([p.input_per_mtok, p.output_per_mtok]),
                                      lambda t: Price(*json.loads(t)))
            row = con.execute("SELECT value FROM meta WHERE key='budget'").fetchone()
            if row is None:
                con.execute("INSERT INTO meta VALUES ('budget', ?)", (str(budget),))
            elif int(row[0]) != budget:
                raise QBudgetError(f"ledger {self.path} was started with budget {row[0]}, "
                                   f"not {budget}")
            self._clear_stale(con)

    def _fixed(self, con, key: str, given, default, dump, load):
        """A setting fixed when the ledger is created: stored, and checked on every reopen
        that states it (None = whatever the ledger was started with)."""
        row = con.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        if row is None:
            value = given if given is not None else default
            con.execute("INSERT INTO meta VALUES (?, ?)", (key, dump(value)))
            return value
        if given is not None and dump(given) != row[0]:
            raise QBudgetError(f"ledger {self.path} was started with {key} {row[0]}, "
                               f"not {dump(given)}")
        return load(row[0])

    # -- counts --------------------------------------------------------------------------
    @property
    def budget(self) -> int:
        return self._budget

    @property
    def caps(self) -> Caps:
        return self._caps

    @property
    def price(self) -> Price:
        return self._price

    def _scalar(self, sql: str, *args) -> int:
        return int(self._db.conn().execute(sql, args).fetchone()[0])

    @property
    def q(self) -> int:
        """Training queries consumed (committed purchases)."""
        return self._scalar("SELECT COUNT(*) FROM purchases WHERE state='bought'")

    @property
    def paid(self) -> int:
        """Oracle calls this run made for training answers (cache hits are free)."""
        return self._scalar("SELECT COUNT(*) FROM answers WHERE kind='train' AND paid=1")

    @property
    def eval_paid(self) -> int:
        """Oracle calls this run made for evaluation (probe) answers."""
        return self._scalar("SELECT COUNT(*) FROM answers WHERE kind='eval' AND paid=1")

    @property
    def remaining(self) -> int:
        """Budget not yet bought nor reserved by an in-flight purchase."""
        return self._budget - self._scalar("SELECT COUNT(*) FROM purchases")

    def spend(self) -> dict:
        """What the run consumed and paid, per account, in every unit.

        ``train``: ``q``, ``tokens``, ``usd`` (committed purchases: what the caps count),
        ``paid``, ``paid_tokens``, ``paid_usd`` (the oracle calls this run made), and
        ``estimated`` (purchases whose usage is an estimate). ``eval``: ``answers``,
        ``tokens``, ``usd`` (evaluation answers the run used), ``paid``, ``paid_tokens``,
        ``paid_usd``, ``estimated``. Each account also counts answers that came from a
        server, a tokenizer or a recording in ``counted``.
        """
        con = self._db.conn()
        q, tokens, usd, est = con.execute(
            "SELECT COUNT(*), COALESCE(SUM(prompt_tokens + completion_tokens), 0), "
            "COALESCE(SUM(usd), 0.0), COALESCE(SUM(usage_source = 'estimate'), 0) "
            "FROM purchases WHERE state='bought'").fetchone()
        out = {"train": {"q": int(q), "tokens": int(tokens), "usd": float(usd),
                         "estimated": int(est)}}
        for kind in ("train", "eval"):
            n, tok, cost, e, paid, ptok, pusd = con.execute(
                "SELECT COUNT(*), COALESCE(SUM(prompt_tokens + completion_tokens), 0), "
                "COALESCE(SUM(usd), 0.0), COALESCE(SUM(usage_source = 'estimate'), 0), "
                "COALESCE(SUM(paid), 0), "
                "COALESCE(SUM(CASE WHEN paid=1 THEN prompt_tokens + completion_tokens END), 0), "
                "COALESCE(SUM(CASE WHEN paid=1 THEN usd END), 0.0) "
                "FROM answers WHERE kind=?", (kind,)).fetchone()
            acct = out.setdefault(kind, {})
            if kind == "eval":
                acct.update(answers=int(n), tokens=int(tok), usd=float(cost), estimated=int(e))
            acct.update(paid=int(paid), paid_tokens=int(ptok), paid_usd=float(pusd))
        return out

    def bought(self) -> list[tuple[str, str]]:
        """(prompt id, response) of every committed purchase, in purchase order."""
        return [tuple(r) for r in self._db.conn().execute(
            "SELECT prompt_id, response FROM purchases WHERE state='bought' ORDER BY seq")]

    def purchase_records(self) -> list[dict]:
        """Every committed purchase in order, with its usage and the cost charged:
        dicts with id, prompt, response, prompt_tokens, completion_tokens, usage_source, usd."""
        keys = ("id", "prompt", "response", "prompt_tokens", "completion_tokens",
                "usage_source", "usd")
        return [dict(zip(keys, r)) for r in self._db.conn().execute(
            "SELECT prompt_id, prompt_text, response, prompt_tokens, completion_tokens, "
            "usage_source, usd FROM purchases WHERE state='bought' ORDER BY seq")]

    # -- buying --------------------------------------------------------------------------
    @staticmethod
    def _clear_stale(con: sqlite3.Connection) -> None:
        """Drop reservations whose owning process on this host is dead (killed mid-purchase)."""
        for (owner,) in con.execute(
                "SELECT DISTINCT owner FROM purchases WHERE state='reserved'").fetchall():
            host, pid, _ = (owner or "::").split(":", 2)
            if host == _HOST and pid.isdigit() and int(pid) != os.getpid() \
                    and not _pid_alive(int(pid)):
                con.execute("DELETE FROM purchases WHERE owner=? AND state='reserved'", (owner,))
        for (owner,) in con.execute("SELECT owner FROM eval_holds").fetchall():
            host, pid, _ = (owner or "::").split(":", 2)
            if host == _HOST and pid.isdigit() and int(pid) != os.getpid() \
                    and not _pid_alive(int(pid)):
                con.execute("DELETE FROM eval_holds WHERE owner=?", (owner,))

    def _train_committed(self, con) -> tuple[int, int, float]:
        """(queries, tokens, usd) bought or reserved: bought at their real usage, reserved
        at their worst case."""
        n, tokens, usd = con.execute(
            "SELECT COUNT(*), COALESCE(SUM(CASE WHEN state='bought' THEN "
            "prompt_tokens + completion_tokens ELSE reserve_tokens END), 0), "
            "COALESCE(SUM(CASE WHEN state='bought' THEN usd ELSE reserve_usd END), 0.0) "
            "FROM purchases").fetchone()
        return int(n), int(tokens), float(usd)

    def buy(self, oracle: Oracle, prompts: Sequence[Prompt], *,
            up_to_cap: bool = False) -> list[str]:
        """Buy answers for ``prompts``: all of them, durably, within budget -- or none.

        With ``up_to_cap`` the longest prefix of ``prompts`` whose worst case fits every cap
        is bought instead (possibly none): the answers returned are that prefix's.
        """
        prompts = list(prompts)
        if not prompts:
            return []
        ids = [p.id for p in prompts]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise QBudgetError(f"prompt '{dup}' appears twice in one purchase")
        caps = self._caps
        worst = [worst_case(oracle, p) for p in prompts] if caps.train_capped else None
        owner = f"{_HOST}:{os.getpid()}:{uuid.uuid4().hex}"
        with self._db.tx() as con:
            self._check_oracle(con, oracle)
            self._clear_stale(con)
            for part in _chunks(ids, _SQL_CHUNK):
                marks = ",".join("?" * len(part))
                row = con.execute(f"SELECT prompt_id, state FROM purchases WHERE prompt_id IN "
                                  f"({marks}) LIMIT 1", part).fetchone()
                if row is not None:
                    how = "already bought" if row[1] == "bought" else "being bought concurrently"
                    raise QBudgetError(f"prompt '{row[0]}' is {how} in this run")
            used, tokens, usd = self._train_committed(con)
            fit, reserve = self._fitting(prompts, worst, used, tokens, usd, up_to_cap)
            prompts = prompts[:fit]
            if not prompts:
                return []
            con.executemany(
                "INSERT INTO purchases (prompt_id, prompt_text, state, owner, reserve_tokens, "
                "reserve_usd) VALUES (?, ?, 'reserved', ?, ?, ?)",
                [(p.id, p.text, owner, *r) for p, r in zip(prompts, reserve)])
        try:
            got = self._answers(oracle, prompts, 0, "train", len(prompts))
            with self._db.tx() as con:
                for p, (resp, usage) in zip(prompts, got):
                    cur = con.execute(
                        "UPDATE purchases SET state='bought', response=?, owner=NULL, "
                        "prompt_tokens=?, completion_tokens=?, usage_source=?, usd=? "
                        "WHERE prompt_id=? AND owner=? AND state='reserved'",
                        (resp, usage.prompt_tokens, usage.completion_tokens, usage.source,
                         self._price.cost(usage), p.id, owner))
                    if cur.rowcount != 1:
                        raise RuntimeError(f"reservation for prompt '{p.id}' vanished")
        except BaseException:
            with self._db.tx() as con:
                con.execute("DELETE FROM purchases WHERE owner=? AND state='reserved'", (owner,))
            raise
        return [resp for resp, _ in got]

    def _fitting(self, prompts, worst, used: int, tokens: int, usd: float,
                 up_to_cap: bool) -> tuple[int, list[tuple[int | None, float | None]]]:
        """How many of ``prompts`` (a prefix) fit every cap, and each one's reservation."""
        caps, reserve = self._caps, []
        for i in range(len(prompts)):
            over = None
            if used + i + 1 > self._budget:
                over = (f"the budget: {used} of {self._budget} queries used, "
                        f"{self._budget - used} left")
            elif worst is not None:
                w = worst[i]
                cost = self._price.cost(w)
                if caps.tokens is not None and tokens + w.tokens > caps.tokens:
                    over = (f"budget.tokens: {tokens} of {caps.tokens} tokens used or reserved, "
                            f"the next request may use {w.tokens}")
                elif caps.usd is not None and usd + cost > caps.usd + 1e-12:
                    over = (f"budget.usd: ${usd:.6f} of ${caps.usd:g} used or reserved, "
                            f"the next request may cost ${cost:.6f}")
                else:
                    tokens, usd = tokens + w.tokens, usd + cost
                    reserve.append((w.tokens, cost))
                    continue
            else:
                reserve.append((None, None))
                continue
            if up_to_cap:
                return i, reserve
            raise QBudgetError(f"buying {len(prompts)} answers would exceed {over}")
        return len(prompts), reserve

    def _check_oracle(self, con: sqlite3.Connection, oracle: Oracle) -> None:
        row = con.execute("SELECT value FROM meta WHERE key='oracle_fingerprint'").fetchone()
        if row is None:
            con.execute("INSERT INTO meta VALUES ('oracle_fingerprint', ?)", (oracle.fingerprint,))
            con.execute("INSERT OR REPLACE INTO meta VALUES ('oracle_name', ?)", (oracle.name,))
        elif row[0] != oracle.fingerprint:
            raise QBudgetError(
                f"this run bought its answers from another oracle (fingerprint {row[0][:12]}), "
                f"not {oracle.name} ({oracle.fingerprint[:12]}): mixing teachers is refused")

    def evaluation_answers(self, oracle: Oracle, prompts: Sequence[Prompt], sample: int = 0,
                           chunk_size: int = 256) -> list[str]:
        """Probe answers through the same store and cache, counted in ``eval_paid``, never q.

        Oracle calls are made ``chunk_size`` prompts at a time and committed after each
        chunk, so an interrupted evaluation keeps what it already paid for. With
        ``Caps.eval_usd`` each chunk's worst case is reserved first; a chunk that does not
        fit is not sent (QBudgetError naming the cap).
        """
        got = self._answers(oracle, list(prompts), int(sample), "eval", max(1, chunk_size))
        return [resp for resp, _ in got]

    # -- answers: run store -> shared cache -> oracle --------------------------------------
    def _store_get(self, fp: str, shas: Sequence[str], sample: int
                   ) -> dict[str, tuple[str, Usage | None]]:
        found: dict[str, tuple[str, Usage | None]] = {}
        con = self._db.conn()
        for part in _chunks(sorted(set(shas)), _SQL_CHUNK):
            marks = ",".join("?" * len(part))
            for sha, resp, *usage in con.execute(
                    f"SELECT prompt_sha, response, prompt_tokens, completion_tokens, "
                    f"usage_source, usage_usd FROM answers WHERE fingerprint=? AND sample=? "
                    f"AND prompt_sha IN ({marks})", (fp, sample, *part)):
                found[sha] = (resp, _usage_from_row(*usage))
        return found

    def _store_put(self, fp: str, items: dict[str, tuple[str, str, Usage]], sample: int,
                   kind: str, paid: bool) -> None:
        """items: sha -> (text, response, usage). Committed to the run's own store first,
        then the cache."""
        if not items:
            return
        with self._db.tx() as con:
            con.executemany(
                "INSERT OR IGNORE INTO answers (fingerprint, prompt_sha, sample, response, kind, "
                "paid, prompt_tokens, completion_tokens, usage_source, usage_usd, usd) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(fp, sha, sample, resp, kind, int(paid), *_usage_row(u), self._price.cost(u))
                 for sha, (_, resp, u) in items.items()])
        if paid and self.cache is not None:
            self.cache.put_many(fp, [(t, r, u) for t, r, u in items.values()], sample)

    def _answers(self, oracle: Oracle, prompts: list[Prompt], sample: int, kind: str,
                 chunk_size: int) -> list[tuple[str, Usage]]:
        if not prompts:
            return []
        fp = oracle.fingerprint
        shas = [prompt_hash(p.text) for p in prompts]
        have = self._store_get(fp, shas, sample)
        # one representative prompt per missing text: the same text is never paid twice
        missing: dict[str, Prompt] = {}
        for p, sha in zip(prompts, shas):
            if sha not in have:
                missing.setdefault(sha, p)
        hold = self._hold_eval(oracle, list(missing.values())) if kind == "eval" else None
        try:
            self._fill(oracle, missing, sample, kind, chunk_size, have)
        finally:
            if hold is not None:
                with self._db.tx() as con:
                    con.execute("DELETE FROM eval_holds WHERE owner=?", (hold,))
        return self._with_usage(prompts, shas, have)

    def _fill(self, oracle: Oracle, missing: dict[str, Prompt], sample: int, kind: str,
              chunk_size: int, have: dict) -> None:
        """Answers for ``missing`` (hash -> prompt) into ``have``: shared cache, else paid."""
        fp = oracle.fingerprint
        if self.cache is None:
            self._pay(oracle, list(missing.items()), sample, kind, chunk_size, have)
            return
        owner = f"{_HOST}:{os.getpid()}:{uuid.uuid4().hex}"
        try:
            while missing:
                answered, mine = self.cache.claim(fp, list(missing), sample, owner)
                from_cache = {s: (missing[s].text, r, u or _estimated(missing[s].text, r))
                              for s, (r, u) in answered.items()}
                self._store_put(fp, from_cache, sample, kind, paid=False)
                for sha, (_, resp, usage) in from_cache.items():
                    have[sha] = (resp, usage)
                    del missing[sha]
                self._pay(oracle, [(sha, missing.pop(sha)) for sha in mine], sample, kind,
                          chunk_size, have)
                self.cache.release(owner)
                if missing:   # another buyer is paying for these: wait for its answers
                    time.sleep(_CLAIM_POLL_S)
        finally:
            self.cache.release(owner)

    @staticmethod
    def _with_usage(prompts, shas, have) -> list[tuple[str, Usage]]:
        out = []
        for p, sha in zip(prompts, shas):
            resp, usage = have[sha]
            out.append((resp, usage if usage is not None else _estimated(p.text, resp)))
        return out

    def _hold_eval(self, oracle: Oracle, batch: list[Prompt]) -> str | None:
        """Reserve under ``Caps.eval_usd`` the worst case of the evaluation answers this run
        does not hold yet (from the cache or the oracle, they are the run's spend), or
        refuse before anything is sent: an evaluation is never left half bought."""
        cap = self._caps.eval_usd
        if cap is None or not batch:
            return None
        need = sum(self._price.cost(worst_case(oracle, p)) for p in batch)
        owner = f"{_HOST}:{os.getpid()}:{uuid.uuid4().hex}"
        with self._db.tx() as con:
            self._clear_stale(con)
            spent = con.execute("SELECT COALESCE(SUM(usd), 0.0) FROM answers "
                                "WHERE kind='eval'").fetchone()[0]
            held = con.execute("SELECT COALESCE(SUM(usd), 0.0) FROM eval_holds").fetchone()[0]
            if spent + held + need > cap + 1e-12:
                raise QBudgetError(
                    f"evaluation answers would exceed budget.eval_usd: ${spent + held:.6f} of "
                    f"${cap:g} used or reserved, the next {len(batch)} requests may cost "
                    f"${need:.6f}")
            con.execute("INSERT INTO eval_holds VALUES (?, ?)", (owner, need))
        return owner

    def _pay(self, oracle: Oracle, todo: list[tuple[str, Prompt]], sample: int, kind: str,
             chunk_size: int, have: dict) -> None:
        """Ask the oracle for ``todo`` (hash, prompt) in chunks, storing each chunk's answers
        (run store, then the shared cache) before the next; results go into ``have``."""
        fp = oracle.fingerprint
        for part in _chunks(todo, chunk_size):
            batch = [p for _, p in part]
            try:
                got = answer_with_usage(oracle, batch, sample)
            except OracleCallError as exc:
                kept = {part[i][0]: (batch[i].text, r, exc.partial_usage.get(i)
                                     or _estimated(batch[i].text, r))
                        for i, r in exc.partial.items()}
                self._store_put(fp, kept, sample, kind, paid=True)
                raise
            if len(got) != len(batch) or not all(isinstance(r, str) for r, _ in got):
                raise RuntimeError(f"oracle {oracle.name} returned {len(got)} answers "
                                   f"for {len(batch)} prompts")
            fresh = {sha: (p.text, r, u) for (sha, p), (r, u) in zip(part, got)}
            self._store_put(fp, fresh, sample, kind, paid=True)
            have.update({sha: (r, u) for sha, (_, r, u) in fresh.items()})
        # re-read what is stored: if a concurrent buyer stored the same text first, its
        # answer is the run's answer (first stored wins, as in the cache)
        if todo:
            have.update(self._store_get(fp, [sha for sha, _ in todo], sample))
