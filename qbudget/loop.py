"""The core loop: spend a query budget round by round and measure the student as it learns.

One round, in the order of :meth:`Run.execute`::

    context  = what the strategy may look at (pool, purchases so far, the student)
    signals  = the quantities the strategy declared (and nothing else)
    picks    = strategy.select(state, signals, context, k, key)
    buy      = the ledger buys the picks' teacher answers (committed before use)
    distill  = the student's LoRA adapters train, warm-started, on everything bought
    snapshot = the run state is written; at each checkpoint of q the student is evaluated

The student is evaluated at every point of the checkpoint schedule (q = 0 is the base
student) by :func:`qbudget.evaluate.evaluate_student`. Each round trains a fixed number
of steps over everything bought so far, so the cost of a run grows linearly with q.

Crash safety: after every round the run state (adapters, optimiser state, strategy
state, round, q) is written atomically. ``resume`` reloads it; the round that was
interrupted is replayed with the same keys, so it selects the same prompts, whose answers
the ledger already holds (they are not bought again), and the run ends with exactly the
rows an uninterrupted run would have written. Randomness is derived from (seed, round,
purpose) by :mod:`qbudget.seeding`, never from hidden state, which makes that replay exact.

Certification (``[certify] epsilon``, off by default): each checkpoint's evaluation also
decides, by a sequential test at that checkpoint's alpha-spending level, whether every
classifier adversary's advantage is ≤ ε; at the first checkpoint where all are, the run
records ``q_certified`` and stops buying. The decision is in the saved state, so a
resumed run stops there too.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from qbudget.config import RunConfig
from qbudget.errors import QBudgetError
from qbudget.resources import Resources, adapter_state, build_resources, restore_adapter_state
from qbudget.rundir import RunDir
from qbudget.seeding import key_for, rng_for
from qbudget.shared_baseline import base_eval_key, base_rows
from qbudget.timings import Timings


@dataclass
class RunState:
    """Everything needed to continue a run after the last completed round."""

    round: int = 0
    q: int = 0
    lora: dict | None = None
    optimizer: dict | None = None
    strategy_state: object = None
    evaluated: list[int] = field(default_factory=list)
    timings: Timings = field(default_factory=Timings)
    #: q at the start of each round (round_q[r] = queries bought before round r's purchase)
    round_q: list[int] = field(default_factory=list)
    #: host copies of the adapters at recent rounds' selection, for signals that ask for them
    adapter_history: dict[int, list] = field(default_factory=dict)
    #: q of the checkpoint at which certification succeeded (the run stops there), or None
    certified_q: int | None = None
    #: the cap ("budget.tokens", "budget.usd") that stopped buying before the query budget
    #: was spent, or None; the run evaluates where it stopped and ends
    stopped_by: str | None = None


@dataclass
class RunOutcome:
    out: Path
    q: int
    paid: int
    rows: int
    timings: Timings


class Run:
    """One (world, strategy, seed, budget) cell. Construct, then :meth:`execute`.

    Everything that can fail on user input (the output directory, the strategy and its
    parameters, the adversaries, the world, a budget larger than the pool) is checked by
    the constructor, before anything is written.
    """

    def __init__(self, cfg: RunConfig, out: str | Path, *, resume: bool = False,
                 cache_path: str | Path | None = None, run_id: str | None = None,
                 progress: Callable[[dict], None] | None = None,
                 shared_dir: str | Path | None = None, cache=None):
        from qbudget.realworld import resolve_world
        from qbudget.signals import adapter_history_depth
        from qbudget.strategy import get_strategy

        self.cfg, self.resume = cfg, resume
        self.dir = RunDir(out)
        self.dir.check(resume, cfg.to_dict())
        self.strategy = get_strategy(cfg.strategy.name, dict(cfg.strategy.params))
        self.history_depth = adapter_history_depth(self.strategy.signals)
        for name in cfg.eval.adversaries:
            cfg.eval.adversary_config(name)
        if cfg.certify.enabled:
            from qbudget.sequential_eval import check_certifying

            check_certifying(cfg.eval)
        self.world = resolve_world(cfg.world)
        if cfg.budget.total > len(self.world.pool):
            raise QBudgetError(f"budget {cfg.budget.total} is larger than the pool of world "
                               f"'{cfg.world}' ({len(self.world.pool)} prompts)")
        for key in ("usd", "eval_usd"):
            if getattr(cfg.budget, key) is not None and getattr(self.world, "price", None) is None:
                raise QBudgetError(f"budget.{key} needs the teacher's price: set [teacher.price] "
                                   f"input_per_mtok and output_per_mtok in {cfg.world}")
        self.cache_path = Path(cache_path) if cache_path else self.dir.cache
        # a ResponseCache-like object instead of the file (a remote sweep's cache service)
        self.cache = cache
        self.run_id = run_id or f"{self.world.name}/{cfg.strategy.name}/seed{cfg.seed}"
        self.progress = progress or (lambda info: None)
        # q = 0 rows shared between runs that differ only in their strategy
        self.shared_dir = Path(shared_dir) if shared_dir else None
        self.res: Resources | None = None
        self._pool_tokens: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def out(self) -> Path:
        return self.dir.out

    # -- the run ---------------------------------------------------------------------------

    def execute(self) -> RunOutcome:
        t0 = time.perf_counter()
        self.dir.out.mkdir(parents=True, exist_ok=True)
        state = self.dir.load_state(self.resume) or RunState()
        if self.resume:
            self.dir.keep_results(state.evaluated)
        else:
            self._write_manifest(state, "running")
        self.res = res = build_resources(self.cfg, self.world, ledger_path=self.dir.ledger,
                                         cache_path=self.cache_path, cache=self.cache)
        if state.lora is not None:
            restore_adapter_state(res, state.lora, state.optimizer)
        if state.strategy_state is None and state.round == 0:
            state.strategy_state = self.strategy.init(self._context(state))
        state.timings.add("setup", time.perf_counter() - t0)

        schedule = self.cfg.schedule(len(self.world.pool))
        total, timed = self.cfg.budget.total, state.timings.stage
        while True:
            stopped = getattr(state, "stopped_by", None) is not None
            if (state.q in schedule or stopped) and state.q not in state.evaluated:
                with timed("evaluate"):
                    rows = self._evaluate(state)
                    self.dir.append_results(rows)
                    state.evaluated.append(state.q)
                self.progress({"event": "evaluated", "q": state.q, "budget": total,
                               "advantage": _headline(rows)})
                if getattr(state, "certified_q", None) is not None:
                    self.progress({"event": "certified", "q": state.q, "budget": total,
                                   "epsilon": self.cfg.certify.epsilon})
                with timed("bookkeeping"):
                    self._save(state)
            if state.q >= total or getattr(state, "certified_q", None) is not None or stopped:
                break
            k = min(self.cfg.budget.round_size, min(c for c in schedule if c > state.q) - state.q)
            with timed("signals"):
                ctx = self._context(state, new_round=True)
                signals = self._signals(ctx, state.round)
            with timed("select"):
                picks, strategy_state = self.strategy.select(
                    state.strategy_state, signals, ctx, k, key_for(self.cfg.seed, "select", state.round))
            with timed("buy"), timed("oracle", clock=lambda: res.oracle.seconds):
                bought = self._buy(picks)
            state.q += bought
            if bought < len(picks):
                state.stopped_by = self._cap_reached()
                self.progress({"event": "stopped", "q": state.q, "budget": total,
                               "cap": state.stopped_by})
                if bought == 0:   # nothing new to learn from: evaluate where it stands
                    with timed("bookkeeping"):
                        self._save(state)
                    continue
            with timed("distill"):
                loss = self._distill(state)
            with timed("bookkeeping"):
                state.round += 1
                state.strategy_state = strategy_state
                self._save(state)
            self.progress({"event": "round", "round": state.round, "q": state.q,
                           "budget": total, "loss": loss})

        from qbudget.models.lora import save_adapter

        save_adapter(res.student, self.dir.adapter, str(self.world.student_dir))
        self._write_manifest(state, "done")
        return RunOutcome(self.dir.out, state.q, res.ledger.paid, self.dir.result_count(),
                          state.timings)

    # -- the steps of a round ----------------------------------------------------------------

    def _context(self, state: RunState, new_round: bool = False):
        """What the strategy sees in this round; ``new_round`` records the round's start."""
        from qbudget.signals import record_adapters
        from qbudget.strategy import SelectionContext

        res = self.res
        if new_round:
            state.round_q = state.round_q[: state.round] + [state.q]
            state.adapter_history = record_adapters(state.adapter_history, state.round,
                                                    res.student, self.history_depth)
        # Only what the saved state has seen: a round interrupted after its purchase was
        # committed must be replayed from the same view, so it makes the same picks.
        bought = res.ledger.bought()[: state.q]
        bought_indices = np.array([res.index_of[pid] for pid, _ in bought], dtype=np.int64)
        mask = np.zeros(len(self.world.pool), dtype=bool)
        mask[bought_indices] = True
        return SelectionContext(
            pool=self.world.pool, categories=res.categories, category_names=res.category_names,
            bought_mask=mask, bought_indices=bought_indices, answers=[a for _, a in bought],
            student=res.student, tokenizer=res.tokenizer, student_dir=self.world.student_dir,
            sampling=self.world.sampling, pool_embeddings=res.pool_embeddings,
            cache_dir=self.world.root, round=state.round, q=state.q,
            budget=self.cfg.budget.total, seed=self.cfg.seed, round_q=tuple(state.round_q),
            adapter_history=dict(state.adapter_history),
            expected_cost=functools.cache(lambda: self._expected_cost(state.q)))

    def _expected_cost(self, q: int) -> np.ndarray:
        """What buying each pool prompt is expected to cost (see ``SelectionContext``):
        US$ at the teacher's price, or tokens where the teacher is free."""
        from qbudget.oracles.usage import worst_case

        res = self.res
        if self._pool_tokens is None:   # prompt tokens and max completion: fixed for a run
            worst = [worst_case(res.oracle, p) for p in self.world.pool]
            self._pool_tokens = (np.array([w.prompt_tokens for w in worst], np.float64),
                                 np.array([w.completion_tokens for w in worst], np.float64))
        prompt, completion = self._pool_tokens
        completion = completion.copy()
        bought = res.ledger.purchase_records()[:q]
        done = [(res.index_of[r["id"]], r["completion_tokens"]) for r in bought
                if r["completion_tokens"] is not None]
        if done:
            idx, ct = np.array([i for i, _ in done]), np.array([c for _, c in done], np.float64)
            completion[:] = ct.mean()
            cats = np.asarray(res.categories)
            for c in np.unique(cats[idx]):
                completion[cats == c] = ct[cats[idx] == c].mean()
        price = res.ledger.price
        if price.input_per_mtok == 0 and price.output_per_mtok == 0:
            return prompt + completion
        return (prompt * price.input_per_mtok + completion * price.output_per_mtok) / 1e6

    def _signals(self, ctx, round_: int) -> dict:
        from qbudget.signals import compute_signals

        return compute_signals(self.strategy.signals, ctx, key_for(self.cfg.seed, "signals", round_))

    def _buy(self, picks: np.ndarray) -> int:
        """Buy the picked prompts; ones bought before a crash are reused, never re-bought.

        Returns how many of the picks are bought: all of them, or -- when a token or dollar
        cap is reached -- the leading ones whose worst case still fitted (the ledger buys a
        prefix, so a replayed round finds the same prefix bought).
        """
        pool, ledger = self.world.pool, self.res.ledger
        already = {pid for pid, _ in ledger.bought()}
        fresh = [pool[int(i)] for i in picks if pool[int(i)].id not in already]
        got = ledger.buy(self.res.oracle, fresh, up_to_cap=ledger.caps.train_capped) if fresh else []
        return len(picks) - len(fresh) + len(got)

    def _cap_reached(self) -> str:
        """Which cap stopped a purchase short (the one with the least room left)."""
        caps, spend = self.res.ledger.caps, self.res.ledger.spend()["train"]
        room = {}
        if caps.tokens is not None:
            room["budget.tokens"] = (caps.tokens - spend["tokens"]) / max(caps.tokens, 1)
        if caps.usd is not None:
            room["budget.usd"] = (caps.usd - spend["usd"]) / caps.usd
        return min(room, key=room.get) if room else "budget"

    def _distill(self, state: RunState) -> float:
        """Train the adapters ``steps_per_round`` steps on everything bought; mean late loss."""
        from qbudget.models.train import PairBatcher, train_steps

        res, d = self.res, self.cfg.distill
        bought = res.ledger.bought()[: state.q]
        prompts = [self.world.pool[res.index_of[pid]].text for pid, _ in bought]
        batcher = PairBatcher(res.tokenizer, prompts, [a for _, a in bought],
                              batch_size=d.batch_size, max_len=d.max_len)
        losses = train_steps(res.student, res.optimizer, batcher, d.steps_per_round,
                             rng=rng_for(self.cfg.seed, "distill", state.round))
        return float(np.mean(losses[-max(1, len(losses) // 4):]))

    def _evaluate(self, state: RunState) -> list[dict]:
        """Result rows at this checkpoint (q = 0 rows may come from another strategy's cell)."""
        from qbudget.evaluate import evaluate_student, teacher_answers

        res, cfg = self.res, self.cfg
        # 1-based position of this evaluation among the run's evaluations: its share of
        # alpha (a run stopped by a cap evaluates once more, off the schedule)
        index = len(state.evaluated) + 1

        def compute() -> list[dict]:
            if cfg.certify.enabled:
                return self._evaluate_certifying(state.q, index)
            teacher, teacher2 = teacher_answers(res.ledger, res.oracle, res.probe,
                                                ceiling=cfg.eval.ceiling)
            return evaluate_student(res.student, res.tokenizer, res.probe, res.probe_is_train,
                                    teacher, teacher2, sampling=self.world.sampling,
                                    seed=cfg.seed, checkpoint=state.q, encoder=res.encoder,
                                    config=cfg.eval, certify=cfg.certify, certify_index=index)

        if state.q == 0:
            key = base_eval_key(cfg.to_dict(), self.world.root, [p.id for p in res.probe])
            rows = base_rows(self.shared_dir, key, compute)
        else:
            rows = compute()
        spend = res.ledger.spend()
        base = {"run_id": self.run_id, "world": self.world.name, "strategy": cfg.strategy.name,
                "seed": cfg.seed, "q": state.q, "paid": spend["train"]["paid"],
                "eval_paid": spend["eval"]["paid"], "tokens": spend["train"]["tokens"],
                "usd": spend["train"]["usd"], "eval_usd": spend["eval"]["usd"]}
        rows = [{**base, **row} for row in rows]
        if cfg.certify.enabled and _certified(rows):
            state.certified_q = state.q
            rows.append({**base, "metric": "q_certified", "adversary": "", "category": "all",
                         "value": float(state.q), "ci_low": float("nan"),
                         "ci_high": float("nan"), "n": 0})
        return rows

    def _evaluate_certifying(self, q: int, index: int) -> list[dict]:
        """A certifying checkpoint's rows: probe answers bought only as far as its verdict
        needs (:mod:`qbudget.sequential_eval`)."""
        from qbudget.sequential_eval import evaluate_student_sequentially

        res, cfg = self.res, self.cfg

        def buy(rows, sample: int) -> list[str]:
            return res.ledger.evaluation_answers(res.oracle, [res.probe[i] for i in rows],
                                                 sample=sample)

        return evaluate_student_sequentially(
            res.student, res.tokenizer, res.probe, res.probe_is_train, buy,
            sampling=self.world.sampling, seed=cfg.seed, checkpoint=q, encoder=res.encoder,
            config=cfg.eval, certify=cfg.certify, certify_index=index)

    def _save(self, state: RunState) -> None:
        state.lora, state.optimizer = adapter_state(self.res)
        self.dir.save_state(state)
        self._write_manifest(state, "running")

    def _write_manifest(self, state: RunState, status: str) -> None:
        res = self.res
        self.dir.write_manifest(self.cfg.to_dict(), self.cfg.seed, {
            "run_id": self.run_id, "status": status, "world": self.cfg.world,
            "strategy": self.cfg.strategy.name, "strategy_params": dict(self.strategy.params),
            "budget": self.cfg.budget.total, "q": state.q,
            "paid": res.ledger.paid if res else 0, "eval_paid": res.ledger.eval_paid if res else 0,
            **({"spend": res.ledger.spend(), "price": dataclasses.asdict(res.ledger.price),
                "caps": dataclasses.asdict(res.ledger.caps),
                "stopped_by": getattr(state, "stopped_by", None)} if res else {}),
            "round": state.round, "checkpoints": self.cfg.schedule(len(self.world.pool)),
            "evaluated": state.evaluated, "probe_size": len(self.world.probe),
            "probe_evaluated": len(res.probe) if res else None,
            "timings": dataclasses.asdict(state.timings),
            **({"certify": {"epsilon": self.cfg.certify.epsilon, "alpha": self.cfg.certify.alpha,
                            "certified": getattr(state, "certified_q", None) is not None,
                            "q_certified": getattr(state, "certified_q", None)}}
               if self.cfg.certify.enabled else {}),
            "response_cache": str(self.cache if self.cache is not None else self.cache_path),
        })


def _certified(rows: list[dict]) -> bool:
    """Whether this checkpoint's joint certification verdict (adversary ``max``) passed."""
    return any(r["metric"] == "certified" and r["adversary"] == "max" and r["value"] == 1.0
               for r in rows)


def _headline(rows: list[dict]) -> float | None:
    for r in rows:
        if r["metric"] == "advantage" and r["adversary"] == "max" and r["category"] == "all":
            return float(r["value"])
    return None


def run(cfg: RunConfig, out: str | Path, **kwargs) -> RunOutcome:
    """Run one cell end to end (see :class:`Run`)."""
    return Run(cfg, out, **kwargs).execute()
