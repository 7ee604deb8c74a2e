"""``qbudget eval``: similarity and adversary advantage of a student against its teacher.

Two sources of answers: two JSONL answer files (``--teacher``/``--student``, optionally
``--teacher2`` for the sampling-noise ceiling; read by :mod:`qbudget.answers`), or a world
(``--world NAME [--adapter DIR]``: the run loop's own evaluation of the base student or
the student with a PEFT adapter; see :func:`evaluate_world`). The evaluation config is
the one a run TOML's ``[eval]`` table holds (``--config RUN.toml``), with the flags on
top. Output is rich tables (classifier adversaries × category: advantage with intervals;
two-sample tests such as ``mmd`` × category: p-value and statistic), or with ``--json``
the result rows as one JSON array. ``--epsilon`` adds the ε verdict, which judges the
classifier adversaries only (an advantage is what ε bounds): a two-sample test's p-value
is reported beside it, and ``--epsilon`` with only two-sample tests selected is refused
before anything is evaluated.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import typer

from qbudget.answers import pair_answer_files
from qbudget.errors import QBudgetError

def evaluate_world(name: str, adapter: str | None, *, config, seed: int, encoder=None,
                   encoder_dir=None) -> list[dict]:
    """Evaluate a world's base student (or the student with a PEFT adapter) on its probe.

    The run loop's own evaluation (:func:`qbudget.evaluate.evaluate_student`) at checkpoint
    0: the same probe subset, teacher answers, sampling seeds and adversary keys, so the
    base student's rows equal a run's q = 0 rows for the same seed and ``[eval]`` settings.
    Teacher answers are bought through an evaluation-only ledger under the qbudget home
    (a second evaluation of the same world pays nothing). ``encoder`` defaults to the
    process's shared encoder of ``encoder_dir``, loaded after the world checks out.
    """
    from qbudget.evaluate import evaluate_student, teacher_answers
    from qbudget.ledger import Ledger, ResponseCache
    from qbudget.models import CausalLM, load_tokenizer
    from qbudget.models.encoder import shared_encoder
    from qbudget.oracles import oracle_for
    from qbudget.pool import stratified_subset
    from qbudget.realworld import resolve_world
    from qbudget.runtime import qbudget_home

    w = resolve_world(name)
    if adapter is not None and not Path(adapter).is_dir():
        raise QBudgetError(f"adapter folder not found: {adapter}")
    keep = stratified_subset(w.probe, w.probe_is_train, config.probe_subset, w.seed)
    probe, is_train = [w.probe[i] for i in keep], np.asarray(w.probe_is_train)[keep]
    home = qbudget_home()
    home.mkdir(parents=True, exist_ok=True)
    with ResponseCache(home / "eval-responses.sqlite") as cache, \
            Ledger(home / "eval-ledger.sqlite", budget=0, cache=cache) as ledger:
        teacher, teacher2 = teacher_answers(ledger, oracle_for(w), probe, ceiling=config.ceiling)
    student = CausalLM.from_pretrained(w.student_dir)
    if adapter is not None:
        from qbudget.models.lora import load_adapter

        load_adapter(student, adapter)
    return evaluate_student(student, load_tokenizer(w.student_dir), probe, is_train, teacher,
                            teacher2, sampling=w.sampling, seed=seed, checkpoint=0,
                            encoder=encoder or shared_encoder(encoder_dir), config=config)


def _fmt(v: float) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:+.3f}"


def _table(title: str, first: str, cats: list[str], body: dict[str, list[str]]):
    """A rich table: one row per key of ``body``, one column per category."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column(first)
    for c in cats:
        table.add_column(c, justify="right")
    for name, cells in body.items():
        table.add_row(name, *cells)
    return table


def _statistic_metric(name: str) -> str:
    """The metric holding a two-sample test's statistic (as :mod:`qbudget.evaluate` names it)."""
    return "mmd_statistic" if name == "mmd" else f"{name}_statistic"


def _test_adversaries(rows: list[dict]) -> list[str]:
    """Adversaries of ``rows`` that are two-sample tests: p-values, no advantage."""
    from qbudget.evaluate import TEST_ADVERSARIES

    return list(dict.fromkeys(r["adversary"] for r in rows if r["metric"] == "p_value"
                              and r["adversary"] in TEST_ADVERSARIES))


def _print_tables(rows: list[dict], alpha: float) -> None:
    from rich.console import Console

    console = Console()
    level = f"{100 * (1 - alpha):g}%"
    cats = ["all"] + sorted({r["category"] for r in rows} - {"all"})
    advs = list(dict.fromkeys(r["adversary"] for r in rows if r["metric"] == "advantage"))
    tests = _test_adversaries(rows)
    lookup = {(r["metric"], r["adversary"], r["category"]): r for r in rows}

    def advantage(a: str, c: str) -> str:
        r, p = lookup.get(("advantage", a, c)), lookup.get(("p_value", a, c))
        return "—" if r is None else (f"{_fmt(r['value'])} [{_fmt(r['ci_low'])}, "
                                      f"{_fmt(r['ci_high'])}]\np={p['value']:.2g} n={r['n']}")

    def similarity(m: str, c: str) -> str:
        r = lookup.get((m, "", c))
        return "—" if r is None else f"{r['value']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"

    def two_sample(a: str, c: str) -> str:
        p, st = lookup.get(("p_value", a, c)), lookup.get((_statistic_metric(a), a, c))
        if p is None:
            return "—"
        label = "MMD²" if a == "mmd" else "stat"
        stat = "" if st is None else f"{label}={st['value']:.3g} "
        return f"p={p['value']:.2g}\n{stat}n={p['n']}"

    if advs:
        console.print(_table(f"advantage 2·acc−1 [{level} Clopper–Pearson; max: Bonferroni]",
                             "adversary", cats, {a: [advantage(a, c) for c in cats] for a in advs}))
    if tests:
        console.print(_table("two-sample tests (p-value, no advantage; mmd: Hamming-kernel "
                             "MMD², permutation p over every probe prompt)", "test", cats,
                             {a: [two_sample(a, c) for c in cats] for a in tests}))
    sims = [m for m in ("similarity", "similarity_ceiling") if (m, "", "all") in lookup]
    if sims:
        console.print(_table(f"cosine similarity of MiniLM embeddings [{level} CI]", "metric",
                             cats, {m: [similarity(m, c) for c in cats] for m in sims}))
    for a in advs:
        if a == "max":
            continue
        q, t, f = (lookup.get((m, a, "all")) for m in
                   ("adversary_q", "adversary_t", "adversary_flops"))
        if q and t and f:
            console.print(f"{a}: q={int(q['value'])} prompts, t={int(t['value'])} steps, "
                          f"~{f['value']:.2e} FLOPs")
    for a in tests:
        f = lookup.get(("adversary_flops", a, "all"))
        console.print(f"{a}: two-sample test, nothing fitted (q=0, t=0)"
                      + (f", ~{f['value']:.2e} FLOPs" if f else ""))


def verdict_message(rows: list[dict], epsilon: float) -> str:
    """The ε verdict on the classifier adversaries, with each two-sample test's overall
    p-value beside it (a test has no advantage, so ε does not apply to it)."""
    from qbudget.evaluate import verdict

    message = verdict(rows, epsilon).message()
    for a in _test_adversaries(rows):
        p = next((r for r in rows if r["metric"] == "p_value" and r["adversary"] == a
                  and r["category"] == "all"), None)
        if p is not None:
            message += (f"; {a}: two-sample test p={p['value']:.2g} (n={p['n']}), "
                        "no advantage, not judged")
    return message


def check_epsilon(epsilon: float, config) -> None:
    """Refuse ``--epsilon`` up front when it cannot apply: out of (0, 1], or no selected
    adversary has an advantage (only two-sample tests such as ``mmd``)."""
    from qbudget.evaluate import TEST_ADVERSARIES, classifier_adversaries

    if not 0 < epsilon <= 1:
        raise QBudgetError(f"--epsilon must be in (0, 1], got {epsilon:g}")
    if not classifier_adversaries(config):
        tests = ", ".join(a for a in config.adversaries if a in TEST_ADVERSARIES)
        raise QBudgetError(f"--epsilon needs a classifier adversary (ngram, embed, pairwise or "
                           f"finetune): {tests} is a two-sample test with a p-value, not an "
                           "advantage to certify")


def _json_safe(rows: list[dict]) -> list[dict]:
    return [{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
             for k, v in r.items()} for r in rows]


def _run_config(path: Path):
    from qbudget.config import load_run_config

    return load_run_config(path)


def eval_config_from_flags(config_file: Path | None, *, adversaries: str | None, q: int | None,
                           t: int | None, alpha: float | None, seed: int | None,
                           probe_subset: int | None, ceiling: bool | None,
                           crossfit: int | None = None):
    """The evaluation config and seed: a run TOML's ``[eval]`` (or the defaults, without the
    ceiling) with the flags given on top. Returns ``(EvalConfig, seed)``."""
    from qbudget.config import EvalConfig

    if config_file is not None:
        run = _run_config(config_file)
        config, seed = run.eval, run.seed if seed is None else seed
    else:
        config, seed = EvalConfig(ceiling=False), 0 if seed is None else seed
    if alpha is not None and not 0 < alpha < 1:
        raise QBudgetError(f"--alpha must be in (0, 1), got {alpha}")
    if t is not None and t < 1:
        raise QBudgetError(f"--t must be at least 1 optimiser step, got {t}")
    if q is not None and q < 1:
        raise QBudgetError(f"--q must be at least 1 adversary-train prompt, got {q}")
    if probe_subset is not None and probe_subset < 0:
        raise QBudgetError(f"--probe-subset must be >= 0, got {probe_subset}")
    if crossfit is not None and not 1 <= crossfit <= 20:
        raise QBudgetError(f"--crossfit must be a number of folds in 1..20, got {crossfit}")
    changes = {k: v for k, v in (("alpha", alpha), ("probe_subset", probe_subset),
                                 ("ceiling", ceiling), ("crossfit", crossfit)) if v is not None}
    if adversaries is not None:
        names = tuple(a.strip() for a in adversaries.split(",") if a.strip())
        if not names:
            raise QBudgetError("--adversaries names no adversary")
        changes["adversaries"] = names
    config = replace(config, **changes)
    for name in config.adversaries:
        sub = config.adversary_config(name)
        sub = replace(sub, **({"q": q} if q is not None else {}),
                      **({"t": t} if t is not None else {}))
        config = replace(config, **{name: sub})
    return config, seed


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_cmd(
        teacher: Path = typer.Option(None, "--teacher", help="Teacher answers JSONL "
                                     "(id, prompt, category, response[, split])."),
        student: Path = typer.Option(None, "--student", help="Student answers JSONL (same ids)."),
        teacher2: Path = typer.Option(None, "--teacher2", help="A second, independent teacher "
                                      "sample (same ids) for the similarity ceiling."),
        world: str = typer.Option(None, "--world", help="Evaluate on a world's probe instead."),
        adapter: Path = typer.Option(None, "--adapter", help="LoRA adapter of the student "
                                     "(with --world; default: the base student)."),
        adversaries: str = typer.Option(None, "--adversaries",
                                        help="Comma-separated adversaries (ngram, embed, "
                                        "pairwise, finetune, and the two-sample test mmd; "
                                        "default ngram,embed,pairwise)."),
        q: int = typer.Option(None, "--q", help="Sample bound for every adversary "
                              "(adversary-train prompts; default: all)."),
        t: int = typer.Option(None, "--t", help="Compute bound (optimiser steps) for every "
                              "adversary (default: each adversary's own)."),
        epsilon: float = typer.Option(None, "--epsilon", help="Print the ε verdict on the "
                                      "classifier adversaries (mmd's p-value beside it)."),
        alpha: float = typer.Option(None, "--alpha", help="1 − confidence level (default 0.05)."),
        seed: int = typer.Option(None, "--seed", help="Seed for splits, sampling and adversaries "
                                 "(default 0)."),
        encoder_dir: Path = typer.Option(None, "--encoder", help="BERT folder for embeddings "
                                         "(default: all-MiniLM-L6-v2)."),
        probe_subset: int = typer.Option(None, "--probe-subset", help="With --world: evaluate on a "
                                         "stratified subset of this many probe prompts (0 = all)."),
        ceiling: bool = typer.Option(None, "--ceiling/--no-ceiling", help="With --world: also "
                                     "sample the teacher twice for the similarity ceiling."),
        crossfit: int = typer.Option(None, "--crossfit", help="K-fold cross-fitting of the "
                                     "classifier adversaries: every prompt becomes a test item "
                                     "(K times the training; 1 = off, the default)."),
        config_file: Path = typer.Option(None, "--config", help="A run TOML: its \\[eval] table "
                                         "(and world, seed) are the defaults of these flags."),
        as_json: bool = typer.Option(False, "--json", help="Print the result rows as JSON."),
    ) -> None:
        """Similarity and bounded-adversary advantage of a student against its teacher."""
        import jax

        from qbudget.evaluate import evaluate_answers
        from qbudget.models.encoder import shared_encoder

        if (teacher is None) != (student is None):
            raise QBudgetError("--teacher and --student must be given together")
        if config_file is not None and teacher is None and world is None:
            world = _run_config(config_file).world
        if world is not None and teacher is not None:
            raise QBudgetError("give either --world or --teacher/--student, not both")
        if world is None and teacher is None:
            raise QBudgetError("nothing to evaluate: give --teacher FILE --student FILE "
                               "or --world NAME")
        if adapter is not None and world is None:
            raise QBudgetError("--adapter only applies with --world")
        if teacher2 is not None and teacher is None:
            raise QBudgetError("--teacher2 needs --teacher and --student")
        config, seed = eval_config_from_flags(
            config_file, adversaries=adversaries, q=q, t=t, alpha=alpha, seed=seed,
            probe_subset=probe_subset, ceiling=ceiling, crossfit=crossfit)
        if epsilon is not None:
            check_epsilon(epsilon, config)
        if world is not None:
            rows = evaluate_world(world, None if adapter is None else str(adapter),
                                  config=config, seed=seed, encoder_dir=encoder_dir)
        else:
            # Validate the files before paying for the encoder.
            probe, is_train, t_ans, s_ans, t2_ans = pair_answer_files(teacher, student,
                                                                      teacher2, seed)
            rows = evaluate_answers(probe, is_train, t_ans, s_ans, t2_ans,
                                    encoder=shared_encoder(encoder_dir), config=config,
                                    key=jax.random.key(seed))
        if as_json:
            typer.echo(json.dumps(_json_safe(rows)))
        else:
            _print_tables(rows, config.alpha)
        if epsilon is not None:   # with --json on stderr, so stdout stays one JSON document
            typer.echo(verdict_message(rows, epsilon), err=as_json)
