"""``qbudget record``: spend a budget on a teacher over a pool and write a replay file.

A real endpoint is paid once; the replay file then lets any strategy and budget up to the
recorded one be simulated for free (``ReplayOracle``). Purchases go through a ledger kept
next to the output (``OUT.ledger.sqlite``), committed chunk by chunk, so an interrupted
recording is resumed by running the same command again: nothing is bought twice, and the
replay file is written atomically at the end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from qbudget.errors import QBudgetError


def _select(pool, budget: int, sample_seed: int | None):
    """The first ``budget`` prompts, or a seeded random subset (kept in pool order)."""
    if budget > len(pool):
        raise QBudgetError(f"budget {budget} is larger than the pool ({len(pool)} prompts)")
    if sample_seed is None:
        return list(pool[:budget])
    import numpy as np

    rng = np.random.default_rng(sample_seed)
    idx = np.sort(rng.choice(len(pool), size=budget, replace=False))
    return [pool[int(i)] for i in idx]


def _make_oracle(teacher_dir, endpoint, replay, model, api, api_key_env, temperature, top_p,
                 max_tokens, seed, concurrency, timeout, max_retries, backoff):
    chosen = [n for n, v in (("--teacher-dir", teacher_dir), ("--endpoint", endpoint),
                             ("--replay", replay)) if v is not None]
    if len(chosen) != 1:
        raise QBudgetError("give exactly one teacher: --teacher-dir, --endpoint or --replay"
                           + (f" (got {' and '.join(chosen)})" if chosen else ""))
    if endpoint is None and (model or api_key_env):
        raise QBudgetError("--model and --api-key-env only apply to --endpoint")
    if teacher_dir is not None:
        from qbudget.oracles import LocalModelOracle

        sampling = {"temperature": temperature if temperature is not None else 0.0,
                    "top_p": top_p if top_p is not None else 1.0,
                    "max_new_tokens": max_tokens if max_tokens is not None else 32}
        return LocalModelOracle(teacher_dir, sampling, seed if seed is not None else 0)
    if replay is not None:
        from qbudget.oracles import ReplayOracle

        return ReplayOracle(replay)
    from qbudget.oracles import HttpOracle, HttpOracleConfig

    if not model:
        raise QBudgetError("--endpoint needs --model")
    settings = {"base_url": endpoint, "model": model, "api": api, "api_key_env": api_key_env,
                "seed": seed, "concurrency": concurrency, "timeout_s": timeout,
                "max_retries": max_retries, "backoff_base_s": backoff}
    for key, value in (("temperature", temperature), ("top_p", top_p), ("max_tokens", max_tokens)):
        if value is not None:
            settings[key] = value
    return HttpOracle(HttpOracleConfig.from_dict(settings))


def record(
    pool: Path = typer.Option(..., "--pool", help="Prompts JSONL (id, text, category)."),
    budget: int = typer.Option(..., "--budget", min=1, help="Number of answers to buy."),
    out: Path = typer.Option(..., "--out", help="Replay file to write (.jsonl or .parquet)."),
    teacher_dir: Optional[Path] = typer.Option(None, "--teacher-dir",
                                               help="Local teacher checkpoint folder."),
    endpoint: Optional[str] = typer.Option(None, "--endpoint",
                                           help="OpenAI-compatible base URL, e.g. http://host:8000/v1."),
    replay: Optional[Path] = typer.Option(None, "--replay",
                                          help="Re-record a subset of an existing replay file."),
    model: Optional[str] = typer.Option(None, "--model", help="Model name sent to the endpoint."),
    api: str = typer.Option("chat", "--api", help="chat (/v1/chat/completions) or completions."),
    api_key_env: Optional[str] = typer.Option(
        None, "--api-key-env", help="NAME of the environment variable holding the API key."),
    temperature: Optional[float] = typer.Option(None, "--temperature"),
    top_p: Optional[float] = typer.Option(None, "--top-p"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens",
                                             help="Max new tokens per answer."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Teacher sampling seed."),
    sample_seed: Optional[int] = typer.Option(
        None, "--sample-seed", help="Buy a seeded random subset of the pool (default: the first Q)."),
    cache: Optional[Path] = typer.Option(None, "--cache",
                                         help="Shared response cache (SQLite) to reuse answers from."),
    chunk: int = typer.Option(64, "--chunk", min=1, help="Answers committed per purchase."),
    concurrency: int = typer.Option(8, "--concurrency", min=1, help="Parallel HTTP requests."),
    timeout: float = typer.Option(60.0, "--timeout", help="HTTP request timeout (seconds)."),
    max_retries: int = typer.Option(5, "--max-retries", min=0, help="HTTP retries per prompt."),
    backoff: float = typer.Option(0.5, "--backoff", help="Base of the exponential backoff (s)."),
) -> None:
    """Buy teacher answers for (a subset of) a pool and write them as a replay file."""
    from qbudget.ledger import Ledger, ResponseCache
    from qbudget.oracles import write_replay
    from qbudget.pool import load_prompts

    if out.suffix not in (".jsonl", ".parquet"):
        raise QBudgetError(f"--out must end in .jsonl or .parquet: {out}")
    if out.exists() and not out.is_file():
        raise QBudgetError(f"--out {out} exists and is not a file")
    prompts = load_prompts(pool)
    chosen = _select(prompts, budget, sample_seed)
    oracle = _make_oracle(teacher_dir, endpoint, replay, model, api, api_key_env, temperature,
                          top_p, max_tokens, seed, concurrency, timeout, max_retries, backoff)
    out.parent.mkdir(parents=True, exist_ok=True)
    shared = ResponseCache(cache) if cache is not None else None
    ledger = Ledger(out.with_name(out.name + ".ledger.sqlite"), budget=budget, cache=shared)
    try:
        chosen_ids = {p.id for p in chosen}
        done = {pid for pid, _ in ledger.bought()}
        if not done <= chosen_ids:
            stray = sorted(done - chosen_ids)[0]
            raise QBudgetError(f"{ledger.path} holds a purchase ('{stray}') outside this "
                               "selection (different pool or --sample-seed); remove it or "
                               "choose another --out")
        todo = [p for p in chosen if p.id not in done]
        _buy_all(ledger, oracle, todo, chunk, len(done), budget)
        category = {p.id: p.category for p in chosen}
        rows = [{"id": pid, "prompt": text, "response": resp, "sample": 0,
                 "category": category[pid]} for pid, text, resp in ledger.bought_records()]
        write_replay(out, rows)
        typer.echo(f"recorded {len(rows)} answers to {out} "
                   f"({ledger.paid} oracle calls paid, {len(rows) - ledger.paid} from cache)")
    finally:
        ledger.close()
        if shared is not None:
            shared.close()


def _buy_all(ledger, oracle, todo, chunk, start, budget) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    with Progress(TextColumn("buying answers"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, disable=not console.is_terminal) as bar:
        task = bar.add_task("buy", total=budget, completed=start)
        for i in range(0, len(todo), chunk):
            part = todo[i:i + chunk]
            ledger.buy(oracle, part)
            bar.advance(task, len(part))


def register(app: typer.Typer) -> None:
    app.command("record")(record)
