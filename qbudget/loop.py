"""The core loop: spend a query budget round by round and measure the student as it learns.

Each round: the strategy selects k unbought pool prompts (only the signals it declares are
computed), the ledger buys their teacher answers (committed durably before the student
sees them), and the student's LoRA adapters are trained, warm-started, for a fixed number
of steps over everything bought so far (so the cost of a run grows linearly with q). At
every point of the checkpoint schedule (q = 0 is the base student) the student answers the
probe and :func:`qbudget.evaluate.evaluate_answers` turns the answers into result rows.

Crash safety: after every round the run state (adapters, optimiser state, strategy state,
round, q) is written atomically. ``resume`` reloads it; the round that was interrupted is
replayed with the same keys, so it selects the same prompts, whose answers the ledger
already holds (they are not bought again), and the run ends with exactly the rows an
uninterrupted run would have written. Randomness is derived from (seed, round, purpose),
never from hidden state, which is what makes that replay exact.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import pickle
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from qbudget.config import RunConfig
from qbudget.errors import QBudgetError
from qbudget.manifest import base_manifest, write_json_atomic
from qbudget.pool import Prompt, category_index

STATE_FILE = "state.pkl"
MANIFEST_FILE = "manifest.json"
RESULTS_FILE = "results.parquet"
LEDGER_FILE = "ledger.sqlite"
CACHE_FILE = "responses.sqlite"
ADAPTER_DIR = "adapter"  # the distilled student's LoRA, in PEFT's format


def stable_seed(*parts: object) -> int:
    """A 31-bit seed from any printable parts; stable across processes and machines."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def rng_for(seed: int, *purpose: object) -> np.random.Generator:
    return np.random.default_rng(stable_seed(seed, *purpose))


def key_for(seed: int, *purpose: object) -> jax.Array:
    return jax.random.key(stable_seed(seed, *purpose))


def stratified_subset(prompts: list[Prompt], is_train: np.ndarray, size: int, seed: int):
    """A probe subset of ``size`` that keeps category and train/test shares.

    Deterministic from the *world* seed, so every cell of a sweep evaluates on the same
    prompts (and shares their cached teacher answers).
    """
    n = len(prompts)
    if size <= 0 or size >= n:
        return list(range(n))
    rng = rng_for(seed, "probe-subset")
    groups: dict[tuple[str, bool], list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault((p.category, bool(is_train[i])), []).append(i)
    keys = sorted(groups)
    exact = np.array([len(groups[k]) * size / n for k in keys])
    take = np.floor(exact).astype(int)
    for j in np.argsort(-(exact - take), kind="stable")[: size - take.sum()]:
        take[j] += 1
    chosen: list[int] = []
    for k, t in zip(keys, take):
        members = np.array(groups[k])
        chosen.extend(members[rng.permutation(len(members))[:t]].tolist())
    return sorted(chosen)


@dataclass
class Timings:
    """Wall seconds per stage; model compute = oracle + distill + evaluate."""

    select: float = 0.0
    signals: float = 0.0
    buy: float = 0.0      # ledger + oracle; the oracle's own share of it is ``oracle``
    oracle: float = 0.0
    distill: float = 0.0
    evaluate: float = 0.0
    bookkeeping: float = 0.0
    setup: float = 0.0

    def add(self, stage: str, seconds: float) -> None:
        setattr(self, stage, getattr(self, stage) + seconds)

    def overhead_fraction(self) -> float:
        """Share of the run outside model compute (selection, ledger, bookkeeping)."""
        compute = self.oracle + self.distill + self.evaluate + self.signals
        total = self.select + self.signals + self.buy + self.distill + self.evaluate + self.bookkeeping
        return 0.0 if total <= 0 else max(0.0, total - compute) / total


class TimedOracle:
    """Wraps an oracle to measure the time spent inside it (model compute or network)."""

    def __init__(self, oracle):
        self._oracle, self.seconds = oracle, 0.0
        self.name, self.fingerprint = oracle.name, oracle.fingerprint

    def answer(self, prompts, sample: int = 0):
        t = time.perf_counter()
        try:
            return self._oracle.answer(prompts, sample=sample)
        finally:
            self.seconds += time.perf_counter() - t


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


@dataclass
class RunOutcome:
    out: Path
    q: int
    paid: int
    rows: int
    timings: Timings


def _pickle_atomic(path: Path, obj) -> None:
    """Pickle ``obj`` to ``path`` atomically (temp file per process + fsync + rename),
    so a reader sees the old file or the new one, even with two writers at once."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as fh:
        pickle.dump(obj, fh, protocol=pickle.HIGHEST_PROTOCOL)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def _load_state(path: Path) -> RunState:
    with path.open("rb") as fh:
        return pickle.load(fh)


def _to_host(tree):
    return jax.tree.map(lambda x: np.asarray(x), tree)


def check_out_dir(out: Path, resume: bool) -> None:
    """Refuse to mix runs: a non-empty DIR needs --resume, --resume needs a run there."""
    if resume:
        if not (out / MANIFEST_FILE).is_file():
            raise QBudgetError(f"--resume: no run to resume in {out} (manifest.json missing)")
    elif out.exists() and any(out.iterdir()):
        raise QBudgetError(f"output directory {out} is not empty (use --resume to continue a run)")


class Run:
    """One (world, strategy, seed, budget) cell. Construct, then :meth:`execute`."""

    def __init__(self, cfg: RunConfig, out: str | Path, *, resume: bool = False,
                 cache_path: str | Path | None = None, run_id: str | None = None,
                 progress: Callable[[dict], None] | None = None,
                 shared_dir: str | Path | None = None):
        # Everything that can fail on user input is checked here, before anything is written.
        from qbudget.realworld import resolve_world
        from qbudget.strategy import get_strategy

        self.cfg = cfg
        self.out = Path(out)
        self.resume = resume
        check_out_dir(self.out, resume)
        if resume:
            self._check_same_config()
        self.strategy = get_strategy(cfg.strategy.name, dict(cfg.strategy.params))
        from qbudget.adversaries import get_adversary

        for name in cfg.eval.adversaries:
            get_adversary(name)
        self.world = resolve_world(cfg.world)
        if cfg.budget.total > len(self.world.pool):
            raise QBudgetError(f"budget {cfg.budget.total} is larger than the pool of world "
                               f"'{cfg.world}' ({len(self.world.pool)} prompts)")
        self.cache_path = Path(cache_path) if cache_path else self.out / CACHE_FILE
        self.run_id = run_id or f"{self.world.name}/{cfg.strategy.name}/seed{cfg.seed}"
        self.progress = progress or (lambda info: None)
        # q = 0 rows shared between runs that differ only in their strategy (see _evaluate)
        self.shared_dir = Path(shared_dir) if shared_dir else None

    def _check_same_config(self) -> None:
        import json

        manifest = json.loads((self.out / MANIFEST_FILE).read_text())
        if manifest.get("config") != json.loads(json_dumps(self.cfg.to_dict())):
            raise QBudgetError(f"--resume: the config differs from the run in {self.out}")

    # -- set-up ----------------------------------------------------------------------------

    def _setup(self, state: RunState):
        from qbudget.evaluate import EvalConfig
        from qbudget.ledger import Ledger, ResponseCache
        from qbudget.models import CausalLM, load_tokenizer
        from qbudget.models.lora import attach_lora
        from qbudget.models.train import make_optimizer
        from flax import nnx

        cfg, w = self.cfg, self.world
        self.tokenizer = load_tokenizer(w.student_dir)
        self.student = CausalLM.from_pretrained(w.student_dir)
        attach_lora(self.student, rank=cfg.distill.rank, alpha=cfg.distill.alpha,
                    targets=cfg.distill.targets, key=key_for(cfg.seed, "lora-init"))
        self.optimizer = make_optimizer(self.student, cfg.distill.learning_rate, wrt=nnx.LoRAParam)
        if state.lora is not None:
            self._restore_weights(state)
        self.oracle = TimedOracle(make_oracle(w))
        self.cache = ResponseCache(self.cache_path)
        self.ledger = Ledger(self.out / LEDGER_FILE, budget=cfg.budget.total, cache=self.cache)
        self.encoder = shared_encoder()
        self.categories, self.category_names = category_index(w.pool, w.categories)
        subset = stratified_subset(w.probe, w.probe_is_train, cfg.eval.probe_subset, w.seed)
        self.probe = [w.probe[i] for i in subset]
        self.probe_is_train = np.asarray(w.probe_is_train)[subset]
        self.eval_config = EvalConfig(adversaries=tuple(cfg.eval.adversaries))
        self.index_of = {p.id: i for i, p in enumerate(w.pool)}
        self._pool_embeddings = None

    def _lora_state(self):
        from flax import nnx

        return nnx.state(self.student, nnx.LoRAParam)

    def _snapshot_weights(self, state: RunState) -> None:
        from flax import nnx

        state.lora = _to_host(self._lora_state().to_pure_dict())
        state.optimizer = _to_host(nnx.state(self.optimizer).to_pure_dict())

    def _restore_weights(self, state: RunState) -> None:
        from flax import nnx

        lora = self._lora_state()
        lora.replace_by_pure_dict(jax.tree.map(np.asarray, state.lora))
        nnx.update(self.student, lora)
        opt = nnx.state(self.optimizer)
        opt.replace_by_pure_dict(jax.tree.map(np.asarray, state.optimizer))
        nnx.update(self.optimizer, opt)

    def pool_embeddings(self) -> np.ndarray:
        if self._pool_embeddings is None:
            from qbudget.signals import cached_pool_embeddings

            self._pool_embeddings = cached_pool_embeddings(self.world.pool, self.world.root)
        return self._pool_embeddings

    # -- one round ---------------------------------------------------------------------------

    def _context(self, state: RunState):
        from qbudget.strategy import SelectionContext

        # Only what the saved state has seen: a round interrupted after its purchase was
        # committed must be replayed from the same view, so it makes the same picks.
        bought = self.ledger.bought()[: state.q]
        bought_indices = np.array([self.index_of[pid] for pid, _ in bought], dtype=np.int64)
        mask = np.zeros(len(self.world.pool), dtype=bool)
        mask[bought_indices] = True
        return SelectionContext(
            pool=self.world.pool, categories=self.categories, category_names=self.category_names,
            bought_mask=mask, bought_indices=bought_indices, answers=[a for _, a in bought],
            student=self.student, tokenizer=self.tokenizer, student_dir=self.world.student_dir,
            sampling=self.world.sampling, pool_embeddings=self.pool_embeddings,
            cache_dir=self.world.root, round=state.round, q=state.q,
            budget=self.cfg.budget.total, seed=self.cfg.seed)

    def _buy(self, picks: np.ndarray) -> None:
        """Buy the picked prompts; ones bought before a crash are reused, never re-bought."""
        already = {pid for pid, _ in self.ledger.bought()}
        fresh = [self.world.pool[int(i)] for i in picks if self.world.pool[int(i)].id not in already]
        if fresh:
            self.ledger.buy(self.oracle, fresh)

    def _distill(self, state: RunState) -> float:
        from qbudget.models.train import PairBatcher, train_steps

        bought = self.ledger.bought()[: state.q]
        pool = self.world.pool
        prompts = [pool[self.index_of[pid]].text for pid, _ in bought]
        answers = [a for _, a in bought]
        d = self.cfg.distill
        batcher = PairBatcher(self.tokenizer, prompts, answers, batch_size=d.batch_size,
                              max_len=d.max_len)
        losses = train_steps(self.student, self.optimizer, batcher, d.steps_per_round,
                             rng=rng_for(self.cfg.seed, "distill", state.round))
        return float(np.mean(losses[-max(1, len(losses) // 4):]))

    def _base_eval_key(self) -> str:
        """What the q = 0 evaluation depends on: everything but the strategy.

        Before the first purchase the student is the base checkpoint with fresh adapters
        and every random choice derives from the seed, so runs of a grid that differ only
        in their strategy evaluate identically at q = 0 and may share the rows.
        """
        cfg = {k: v for k, v in self.cfg.to_dict().items() if k != "strategy"}
        info = Path(self.world.root) / "world.json"
        from qbudget import __version__

        parts = [__version__, json_dumps(cfg), str(self.world.root),
                 hashlib.sha256(info.read_bytes()).hexdigest() if info.is_file() else "",
                 ",".join(p.id for p in self.probe)]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]

    def _evaluate(self, state: RunState) -> list[dict]:
        shared = None
        if state.q == 0 and self.shared_dir is not None:
            shared = self.shared_dir / f"q0-{self._base_eval_key()}.pkl"
            if shared.is_file():
                rows = pickle.loads(shared.read_bytes())
                return [{**self._row_base(state), **row} for row in rows]
        rows = self._evaluate_rows(state)
        if shared is not None:
            shared.parent.mkdir(parents=True, exist_ok=True)
            _pickle_atomic(shared, rows)
        return [{**self._row_base(state), **row} for row in rows]

    def _row_base(self, state: RunState) -> dict:
        return {"run_id": self.run_id, "world": self.world.name, "strategy": self.cfg.strategy.name,
                "seed": self.cfg.seed, "q": state.q, "paid": self.ledger.paid}

    def _evaluate_rows(self, state: RunState) -> list[dict]:
        from qbudget.evaluate import evaluate_answers
        from qbudget.models.generate import generate_text

        s = self.world.sampling
        teacher = self.ledger.evaluation_answers(self.oracle, self.probe, sample=0)
        teacher2 = (self.ledger.evaluation_answers(self.oracle, self.probe, sample=1)
                    if self.cfg.eval.ceiling else None)
        seeds = [stable_seed(self.cfg.seed, "student-probe", state.q, p.id) for p in self.probe]
        student = generate_text(self.student, self.tokenizer, [p.text for p in self.probe],
                                max_new_tokens=s["max_new_tokens"], temperature=s["temperature"],
                                top_p=s.get("top_p", 1.0), seeds=seeds)
        return evaluate_answers(self.probe, self.probe_is_train, teacher, student, teacher2,
                                encoder=self.encoder, config=self.eval_config,
                                key=key_for(self.cfg.seed, "evaluate", state.q))

    # -- the run ---------------------------------------------------------------------------

    def _write_manifest(self, state: RunState, status: str) -> None:
        manifest = base_manifest("run", json_roundtrip(self.cfg.to_dict()), self.cfg.seed)
        path = self.out / MANIFEST_FILE
        if path.is_file():
            import json

            manifest["created"] = json.loads(path.read_text()).get("created", manifest["created"])
        manifest.update({
            "run_id": self.run_id, "status": status, "world": self.cfg.world,
            "strategy": self.cfg.strategy.name, "strategy_params": dict(self.strategy.params),
            "budget": self.cfg.budget.total, "q": state.q,
            "paid": getattr(self, "ledger", None) and self.ledger.paid or 0,
            "eval_paid": getattr(self, "ledger", None) and self.ledger.eval_paid or 0,
            "round": state.round, "checkpoints": self.cfg.schedule(len(self.world.pool)),
            "evaluated": state.evaluated, "probe_size": len(self.world.probe),
            "probe_evaluated": len(getattr(self, "probe", [])) or None,
            "timings": dataclasses.asdict(state.timings), "response_cache": str(self.cache_path),
        })
        write_json_atomic(path, manifest)

    def execute(self) -> RunOutcome:
        from qbudget.results import append_results, read_results, write_results
        from qbudget.signals import compute_signals

        t0 = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        state_path = self.out / STATE_FILE
        state = _load_state(state_path) if (self.resume and state_path.is_file()) else RunState()
        results_path = self.out / RESULTS_FILE
        if self.resume and results_path.is_file():
            # Rows evaluated after the last saved state are recomputed; drop them first.
            df = read_results(results_path)
            write_results(results_path, df[df["q"].isin(state.evaluated)].to_dict("records"))
        if not self.resume:
            self._write_manifest(state, "running")
        self._setup(state)
        if state.strategy_state is None and state.round == 0:
            state.strategy_state = self.strategy.init(self._context(state))
        state.timings.add("setup", time.perf_counter() - t0)

        schedule = self.cfg.schedule(len(self.world.pool))
        total = self.cfg.budget.total
        while True:
            if state.q in schedule and state.q not in state.evaluated:
                t = time.perf_counter()
                rows = self._evaluate(state)
                append_results(results_path, rows)
                state.evaluated.append(state.q)
                state.timings.add("evaluate", time.perf_counter() - t)
                self.progress({"event": "evaluated", "q": state.q, "budget": total,
                               "advantage": _headline(rows)})
                t = time.perf_counter()
                self._snapshot_weights(state)
                _pickle_atomic(state_path, state)
                self._write_manifest(state, "running")
                state.timings.add("bookkeeping", time.perf_counter() - t)
            if state.q >= total:
                break
            next_cp = min(c for c in schedule if c > state.q)
            k = min(self.cfg.budget.round_size, next_cp - state.q)

            t = time.perf_counter()
            ctx = self._context(state)
            signals = compute_signals(self.strategy.signals, ctx,
                                      key_for(self.cfg.seed, "signals", state.round))
            state.timings.add("signals", time.perf_counter() - t)
            t = time.perf_counter()
            picks, new_strategy_state = self.strategy.select(
                state.strategy_state, signals, ctx, k, key_for(self.cfg.seed, "select", state.round))
            picks = np.asarray(picks, dtype=np.int64)
            _check_picks(picks, ctx.bought_mask, k, self.cfg.strategy.name)
            state.timings.add("select", time.perf_counter() - t)

            t, oracle_before = time.perf_counter(), self.oracle.seconds
            self._buy(picks)
            state.timings.add("buy", time.perf_counter() - t)
            state.timings.add("oracle", self.oracle.seconds - oracle_before)

            state.q += len(picks)
            t = time.perf_counter()
            loss = self._distill(state)
            state.timings.add("distill", time.perf_counter() - t)

            t = time.perf_counter()
            state.round += 1
            state.strategy_state = new_strategy_state
            self._snapshot_weights(state)
            _pickle_atomic(state_path, state)
            self._write_manifest(state, "running")
            state.timings.add("bookkeeping", time.perf_counter() - t)
            self.progress({"event": "round", "round": state.round, "q": state.q,
                           "budget": total, "loss": loss})

        from qbudget.models.lora import save_adapter

        save_adapter(self.student, self.out / ADAPTER_DIR, str(self.world.student_dir))
        self._write_manifest(state, "done")
        return RunOutcome(self.out, state.q, self.ledger.paid,
                          len(read_results(results_path)), state.timings)


def _check_picks(picks: np.ndarray, bought_mask: np.ndarray, k: int, name: str) -> None:
    """A strategy bug must not spend budget: validate before buying."""
    remaining = int((~bought_mask).sum())
    if len(picks) != min(k, remaining):
        raise RuntimeError(f"strategy '{name}' returned {len(picks)} picks, expected {min(k, remaining)}")
    if len(np.unique(picks)) != len(picks):
        raise RuntimeError(f"strategy '{name}' returned duplicate picks")
    if picks.size and (picks.min() < 0 or picks.max() >= len(bought_mask) or bought_mask[picks].any()):
        raise RuntimeError(f"strategy '{name}' picked an out-of-range or already bought prompt")


def _headline(rows: list[dict]) -> float | None:
    for r in rows:
        if r["metric"] == "advantage" and r["adversary"] == "max" and r["category"] == "all":
            return float(r["value"])
    return None


def json_dumps(obj) -> str:
    import json

    return json.dumps(obj, sort_keys=True, default=list)


def json_roundtrip(obj):
    import json

    return json.loads(json_dumps(obj))


@functools.lru_cache(maxsize=1)
def shared_encoder():
    """The default sentence encoder, loaded once per process.

    Why: a sweep worker runs many cells; sharing the encoder shares its compiled shapes
    and its memo of teacher-answer/prompt embeddings (identical across cells of a world).
    Nothing mutates it: the finetune adversary trains on a split copy of its state.
    """
    from qbudget.models import SentenceEncoder

    return SentenceEncoder.from_pretrained()


def make_oracle(world):
    """The teacher of a world: its own oracle if it defines one, else its local checkpoint."""
    if hasattr(world, "make_oracle"):
        return world.make_oracle()
    from qbudget.oracles import LocalModelOracle

    return LocalModelOracle(world.teacher_dir, world.sampling, world.seed)


def run(cfg: RunConfig, out: str | Path, **kwargs) -> RunOutcome:
    """Run one cell end to end (see :class:`Run`)."""
    return Run(cfg, out, **kwargs).execute()
