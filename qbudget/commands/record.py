"""``qbudget record``: spend a budget on a teacher over a pool and write a replay file.

A real endpoint is paid once; the replay file then lets any strategy and budget up to the
recorded one be simulated for free (``ReplayOracle``). Purchases go through a ledger kept
next to the output (``OUT.ledger.sqlite``), committed chunk by chunk, so an interrupted
recording is resumed by running the same command again: nothing is bought twice, and the
replay file is written atomically at the end. Each row carries the answer's usage
(``prompt_tokens``, ``completion_tokens``, ``usage_source``) and, when a price is known
(``--input-per-mtok`` / ``--output-per-mtok``, or the answer's own cost), ``usd``: the
recorded study replays with its token counts and costs.

Batch mode (:mod:`qbudget.batchfiles`) buys through a provider's Batch API instead:
``--batch-out FILE`` writes one request line per selected prompt and pays nothing;
``--batch-in RESULTS`` (repeatable: the output and the error file) reads the finished
batch into ``--out``, pricing each answer at the list price (``--input-per-mtok``,
``--output-per-mtok``) less ``--batch-discount`` (default 0.5: OpenAI's Batch API is 50%
off). Answers that failed or fail the answer checks are reported and not written.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional

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


def _number(value: str | None, option: str, *, below_one: bool = False) -> float | None:
    """A price or discount option (taken as text, so a bad value is one line naming it)."""
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number < 0 or (below_one and number >= 1):
        want = "a number in [0, 1)" if below_one else "a number >= 0"
        raise QBudgetError(f"{option} must be {want}, got {value!r}")
    return number


def _price(input_per_mtok, output_per_mtok, required: bool):
    from qbudget.oracles.usage import Price

    given = [v is not None for v in (input_per_mtok, output_per_mtok)]
    if any(given) and not all(given):
        missing = "--output-per-mtok" if given[0] else "--input-per-mtok"
        raise QBudgetError(f"{missing} is missing (--input-per-mtok and --output-per-mtok "
                           "come together)")
    if not any(given):
        if required:
            raise QBudgetError("--batch-in needs the list price: --input-per-mtok and "
                               "--output-per-mtok (US dollars per million tokens)")
        return None
    return Price(_number(input_per_mtok, "--input-per-mtok"),
                 _number(output_per_mtok, "--output-per-mtok"))


def _check_batch_args(batch_out, batch_in, out, budget, teacher_dir, replay, api_key_env,
                      cache, model) -> None:
    mode = "--batch-out" if batch_out is not None else "--batch-in"
    if batch_out is not None and batch_in:
        raise QBudgetError("give --batch-out (write requests) or --batch-in (read results), "
                           "not both")
    for option, value in (("--teacher-dir", teacher_dir), ("--replay", replay),
                          ("--cache", cache)):
        if value is not None:
            raise QBudgetError(f"{option} does not apply to {mode} (a batch goes to an "
                               "--endpoint's Batch API)")
    if api_key_env:
        raise QBudgetError(f"--api-key-env does not apply to {mode}: nothing is sent "
                           "(upload the file with the provider's own tools)")
    if not model:
        raise QBudgetError(f"{mode} needs --model")
    if batch_out is not None:
        if out is not None:
            raise QBudgetError("--batch-out writes only the request file: drop --out (give "
                               "it with --batch-in, when the results are back)")
        if budget is None:
            raise QBudgetError("--batch-out needs --budget (how many prompts to request)")
    elif out is None:
        raise QBudgetError("--batch-in needs --out (the replay file to write)")


def _batch_oracle(endpoint, model, api, temperature, top_p, max_tokens, seed):
    """The HttpOracle a batch stands in for: builds its request bodies, checks its answers.

    Nothing is sent, so the endpoint only names the provider (default: OpenAI's)."""
    from qbudget.oracles import HttpOracle, HttpOracleConfig

    settings = {"base_url": endpoint or BATCH_ENDPOINT, "model": model, "api": api,
                "seed": seed}
    for key, value in (("temperature", temperature), ("top_p", top_p), ("max_tokens", max_tokens)):
        if value is not None:
            settings[key] = value
    return HttpOracle(HttpOracleConfig.from_dict(settings))


#: the provider a batch goes to when no --endpoint is given (only named, never contacted)
BATCH_ENDPOINT = "https://api.openai.com/v1"


def record(
    pool: Path = typer.Option(..., "--pool", help="Prompts JSONL (id, text, category)."),
    budget: Optional[int] = typer.Option(
        None, "--budget", help="Number of answers to buy (optional with --batch-in)."),
    out: Optional[Path] = typer.Option(None, "--out",
                                       help="Replay file to write (.jsonl or .parquet)."),
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
    input_per_mtok: Optional[str] = typer.Option(
        None, "--input-per-mtok", metavar="USD", help="List price, US$ per million prompt tokens."),
    output_per_mtok: Optional[str] = typer.Option(
        None, "--output-per-mtok", metavar="USD", help="List price, US$ per million completion tokens."),
    batch_out: Optional[Path] = typer.Option(
        None, "--batch-out", metavar="FILE", help="Write Batch API request lines (.jsonl) instead of buying."),
    batch_in: Optional[List[Path]] = typer.Option(
        None, "--batch-in", metavar="FILE", help="Read a finished batch's output (and error) file into --out."),
    batch_discount: Optional[str] = typer.Option(
        None, "--batch-discount", metavar="D",
        help="Batch price discount in [0, 1) (default 0.5: OpenAI's Batch API is 50% off)."),
) -> None:
    """Buy teacher answers for (a subset of) a pool and write them as a replay file."""
    from qbudget.pool import load_prompts

    if budget is not None and budget < 1:
        raise QBudgetError(f"--budget must be at least 1 (answers to buy), got {budget}")
    if batch_out is not None or batch_in:
        _check_batch_args(batch_out, batch_in, out, budget, teacher_dir, replay, api_key_env,
                          cache, model)
    if batch_out is not None and (input_per_mtok is not None or output_per_mtok is not None):
        raise QBudgetError("--input-per-mtok and --output-per-mtok do not apply to --batch-out "
                           "(nothing is bought: give them with --batch-in)")
    price = _price(input_per_mtok, output_per_mtok, required=bool(batch_in))
    if batch_discount is not None and not batch_in:
        raise QBudgetError("--batch-discount only applies to --batch-in")
    discount = _number(batch_discount, "--batch-discount", below_one=True)
    if sample_seed is not None and budget is None:
        raise QBudgetError("--sample-seed needs --budget (it draws that many prompts)")
    if out is not None:
        if out.suffix not in (".jsonl", ".parquet"):
            raise QBudgetError(f"--out must end in .jsonl or .parquet: {out}")
        if out.exists() and not out.is_file():
            raise QBudgetError(f"--out {out} exists and is not a file")
    elif batch_out is None:
        raise QBudgetError("--out is required (the replay file to write)")
    if budget is None and not batch_in:
        raise QBudgetError("--budget is required (the number of answers to buy)")
    prompts = load_prompts(pool)
    chosen = _select(prompts, budget, sample_seed) if budget is not None else None
    if batch_out is not None or batch_in:
        oracle = _batch_oracle(endpoint, model, api, temperature, top_p, max_tokens, seed)
        if batch_out is not None:
            _write_requests(batch_out, oracle, chosen)
        else:
            _ingest(batch_in, oracle, prompts, chosen, out, price, discount)
        return
    oracle = _make_oracle(teacher_dir, endpoint, replay, model, api, api_key_env, temperature,
                          top_p, max_tokens, seed, concurrency, timeout, max_retries, backoff)
    _record(oracle, chosen, out, budget, cache, chunk, price)


def _write_requests(path: Path, oracle, chosen) -> None:
    from qbudget.batchfiles import batch_url, write_batch_requests

    n = write_batch_requests(path, oracle, chosen)
    typer.echo(f"wrote {n} batch requests ({batch_url(oracle)}, model {oracle.config.model}) "
               f"to {path}; nothing was paid. Submit it to the Batch API, then run again with "
               "--batch-in OUTPUT.jsonl --out REPLAY.jsonl and the list price")


def _ingest(paths, oracle, pool, chosen, out: Path, price, discount) -> None:
    from qbudget.batchfiles import OPENAI_BATCH_DISCOUNT, read_batch_results
    from qbudget.oracles import write_replay

    discount = OPENAI_BATCH_DISCOUNT if discount is None else discount
    got = read_batch_results(paths, oracle, pool, price, discount, selection=chosen)
    problems = got.problems()
    if not got.rows:
        raise QBudgetError("no usable answers in the batch results"
                           + (f" ({'; '.join(problems)})" if problems else ""))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_replay(out, got.rows)
    for line in problems:
        typer.echo(f"warning: {line}", err=True)
    tokens = sum(r["prompt_tokens"] + r["completion_tokens"] for r in got.rows)
    typer.echo(f"recorded {len(got.rows)} answers to {out} from the batch results "
               f"({tokens} tokens, ${got.usd:.6f} at a {discount:.0%} batch discount)"
               + (f"; {len(got.failed) + len(got.refused)} not recorded (see the warnings)"
                  if got.failed or got.refused else ""))


def _record(oracle, chosen, out: Path, budget: int, cache, chunk: int, price) -> None:
    from qbudget.ledger import Ledger, ResponseCache
    from qbudget.oracles import write_replay

    out.parent.mkdir(parents=True, exist_ok=True)
    shared = ResponseCache(cache) if cache is not None else None
    ledger = Ledger(out.with_name(out.name + ".ledger.sqlite"), budget=budget, cache=shared,
                    price=price)
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
        priced = price is not None or ledger.price.input_per_mtok > 0 \
            or ledger.price.output_per_mtok > 0
        rows = [_replay_row(rec, category[rec["id"]], priced)
                for rec in ledger.purchase_records()]
        write_replay(out, rows)
        tokens = sum(r.get("prompt_tokens", 0) + r.get("completion_tokens", 0) for r in rows)
        cost = f", ${sum(r['usd'] for r in rows):.6f}" if priced else ""
        typer.echo(f"recorded {len(rows)} answers to {out} "
                   f"({ledger.paid} oracle calls paid, {len(rows) - ledger.paid} from cache; "
                   f"{tokens} tokens{cost})")
    finally:
        ledger.close()
        if shared is not None:
            shared.close()


def _replay_row(rec: dict, category: str, priced: bool) -> dict:
    """A purchase as a replay row with its usage columns.

    ``usd`` is the cost the ledger charged. Without a price (none given, none stored in the
    ledger) that is 0 for every answer that carries no cost of its own: such a zero is not
    a bill, so it is left out (a later run prices the tokens at its own price)."""
    row = {"id": rec["id"], "prompt": rec["prompt"], "response": rec["response"], "sample": 0,
           "category": category}
    if rec.get("prompt_tokens") is not None and rec.get("completion_tokens") is not None:
        row.update(prompt_tokens=int(rec["prompt_tokens"]),
                   completion_tokens=int(rec["completion_tokens"]),
                   usage_source=rec.get("usage_source") or "recorded")
        usd = rec.get("usd")
        if usd is not None and (priced or usd > 0):
            row["usd"] = float(usd)
    return row


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
