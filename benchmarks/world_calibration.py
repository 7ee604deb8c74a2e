"""World calibration: do the embedded worlds behave like the study's worlds?

For each world and each seed: the base student against the teacher on the full
5,000-prompt probe (q = 0), and the student after LoRA distillation on 1,000 random pool
prompts (q = 1000), both measured through the product path (``qbudget.loop.Run`` with
the ``random`` strategy, the default adversaries, and the distillation settings and round
size of ``benchmarks/default.toml``). The seed is the run's seed: it changes which pool
prompts are bought, the distillation batches, the student's samples and the adversaries'
training, not the world. Checks (issue 3), each on one quantity per seed:

* semantic similarity of the base student clearly below teacher-vs-teacher:
  ``ceiling − similarity > 0.01``;
* best default adversary's advantage (all categories) at q = 0 in [0.25, 0.85];
* after distillation that advantage at least halved: ``distilled / base ≤ 0.5``;
* residual gaps where the study found them: in style-format, robustness and
  domain-technical the lower Clopper–Pearson bound of the distilled advantage > 0;
* a rare category (pool share ≤ 3%) among the three largest base gaps: ``margin ≥ 0``,
  where margin = the largest rare category's base advantage − the third largest base
  advantage among the other categories (≥ 0 exactly when a rare one is in the top three,
  ties aside).

A check is a statistic over seeds, not one run (issue 21, item 4): for each quantity the
mean over seeds and its two-sided 95% Student-t interval (mean ± t₀.₉₇₅,ₙ₋₁ · s / √n,
clipped to [−1, 1] for advantages and similarities; zero-wide when every seed gives the
same value, as discrete per-category advantages sometimes do).
Verdict: ``pass`` when the whole interval lies inside the target, ``consistent`` when the
interval overlaps the target (the threshold lies within it), ``fail`` when the whole
interval lies on the wrong side of the threshold. ``pass`` and ``consistent`` pass; the
exit code is 1 only when some check fails by its interval. With one seed the interval is
the value itself and the verdicts are the single-run checks. Why t and not a bootstrap:
with 3 seeds a percentile bootstrap has 10 distinct resamples (126 with 5), its interval
lies inside the observed range and under-covers; the t interval is exact for
normal per-seed values (each an average over 1,000 test decisions) and honest about
how little a handful of seeds pins down.

Prints one JSON object per world (per-seed values, mean, interval and verdict per check)
and writes the figures into docs/worlds.md (``--doc``) between the
``<!-- calibration:start -->`` and ``<!-- calibration:end -->`` markers.

    .venv/bin/python benchmarks/world_calibration.py [--worlds tiny-qwen2,tiny-llama]
        [--seeds 0,1,2] [--budget 1000] [--out bench-out/calibration]
        [--doc docs/worlds.md] [--no-doc] [--from-json FILE ...]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOCUS = ("style-format", "robustness", "domain-technical")
RARE_SHARE = 0.03
START, END = "<!-- calibration:start -->", "<!-- calibration:end -->"
DEFAULT_SEEDS = "0,1,2"
ALPHA = 0.05
INF = math.inf

ADV = (-1.0, 1.0)  # the range of an advantage (and of a cosine similarity)
# name -> (what the quantity is, target as (low, high, low_strict, high_strict), the
# quantity's range, to which its interval is clipped: None = unbounded)
CHECKS = {
    "similarity_below_ceiling": ("ceiling − similarity at q = 0", (0.01, INF, True, False),
                                 None),
    "base_advantage_in_range": ("best advantage at q = 0", (0.25, 0.85, False, False), ADV),
    "distilled_advantage_halved": ("distilled / base advantage", (-INF, 0.5, False, False),
                                   None),
    **{f"residual_lower_bound_above_0[{c}]": (f"{c}: CP lower bound of distilled advantage",
                                               (0.0, INF, True, False), ADV) for c in FOCUS},
    "rare_category_among_top_gaps": ("best rare − 3rd other base advantage",
                                     (0.0, INF, False, False), None),
}


# --------------------------------------------------------------------------- one run

def _row(df, q, metric, category="all", adversary=None):
    sel = df[(df.q == q) & (df.metric == metric) & (df.category == category)]
    if adversary is not None:
        sel = sel[sel.adversary == adversary]
    if sel.empty:
        return None
    r = sel.iloc[0]
    return {"value": round(float(r.value), 4), "ci_low": round(float(r.ci_low), 4),
            "ci_high": round(float(r.ci_high), 4)}


def run_seed(world, name: str, budget: int, out: Path, seed: int) -> dict:
    """One calibration run of ``world`` at ``seed``: the figures and the single-run checks."""
    from qbudget.config import BudgetConfig, RunConfig, StrategyConfig, load_bench_config
    from qbudget.loop import Run
    from qbudget.results import read_results
    from qbudget.worlds.specs import POOL_SHARES

    # distillation as `make bench` runs it (benchmarks/default.toml), on the full probe
    bench = load_bench_config(ROOT / "benchmarks" / "default.toml")
    cfg = RunConfig(world=name, strategy=StrategyConfig("random", {}),
                    budget=BudgetConfig(total=budget, round_size=bench.run.budget.round_size,
                                        checkpoints=(0, budget)),
                    distill=bench.run.distill, seed=seed)
    run_dir = out / name / f"seed{seed}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    t1 = time.perf_counter()
    Run(cfg, run_dir).execute()
    run_s = time.perf_counter() - t1
    df = read_results(run_dir)

    per_cat = {}
    for c in world.categories:
        per_cat[c] = {"pool_share": POOL_SHARES.get(c),
                      "base": _row(df, 0, "advantage", c, "max"),
                      "distilled": _row(df, budget, "advantage", c, "max")}
    result = {
        "world": name, "seed": seed, "budget": budget, "run_seconds": round(run_s, 1),
        "base_advantage": _row(df, 0, "advantage", adversary="max"),
        "distilled_advantage": _row(df, budget, "advantage", adversary="max"),
        "similarity": _row(df, 0, "similarity"),
        "similarity_ceiling": _row(df, 0, "similarity_ceiling"),
        "distilled_similarity": _row(df, budget, "similarity"),
        "categories": per_cat,
    }
    return with_checks(result)


def quantities(r: dict) -> dict[str, float | None]:
    """The checked quantity of every check (``CHECKS``) in one seed's result."""
    per_cat, base, sim, ceiling = (r["categories"], r["base_advantage"], r["similarity"],
                                   r["similarity_ceiling"])
    after = r["distilled_advantage"]
    q: dict[str, float | None] = {
        "similarity_below_ceiling": (ceiling["value"] - sim["value"]) if sim and ceiling else None,
        "base_advantage_in_range": base["value"] if base else None,
        "distilled_advantage_halved": (after["value"] / base["value"]
                                       if base and after and base["value"] > 0 else None),
    }
    for c in FOCUS:
        d = (per_cat.get(c) or {}).get("distilled")
        q[f"residual_lower_bound_above_0[{c}]"] = d["ci_low"] if d else None
    gaps = {c: v["base"]["value"] for c, v in per_cat.items() if v.get("base")}
    rare = [g for c, g in gaps.items() if (per_cat[c]["pool_share"] or 1) <= RARE_SHARE]
    other = sorted((g for c, g in gaps.items() if (per_cat[c]["pool_share"] or 1) > RARE_SHARE),
                   reverse=True)
    q["rare_category_among_top_gaps"] = (
        None if not rare else max(rare) - (other[2] if len(other) >= 3 else -1.0))
    return {k: (None if v is None else round(float(v), 4)) for k, v in q.items()}


def within(x: float, target) -> bool:
    lo, hi, lo_strict, hi_strict = target
    return (x > lo if lo_strict else x >= lo) and (x < hi if hi_strict else x <= hi)


def with_checks(r: dict) -> dict:
    """Add ``largest_base_gaps``, ``quantities`` and the single-run ``checks`` to one seed's result."""
    per_cat = r["categories"]
    ranked = sorted(per_cat, key=lambda c: -(per_cat[c]["base"] or {"value": 0})["value"])
    r["largest_base_gaps"] = ranked[:3]
    r["quantities"] = quantities(r)
    r["checks"] = {k: (v is not None and within(v, CHECKS[k][1]))
                   for k, v in r["quantities"].items()}
    return r


# --------------------------------------------------------------------------- over seeds

def t_interval(values, alpha: float = ALPHA) -> tuple[float, float, float]:
    """(mean, low, high): two-sided Student-t interval of the mean over seeds.

    With one value the interval is the value itself (the single-run check)."""
    from scipy import stats as st

    x = [float(v) for v in values]
    n = len(x)
    if n == 0:
        return (math.nan, math.nan, math.nan)
    m = sum(x) / n
    if n == 1:
        return (m, m, m)
    s = math.sqrt(sum((v - m) ** 2 for v in x) / (n - 1))
    half = float(st.t.ppf(1 - alpha / 2, n - 1)) * s / math.sqrt(n)
    return (m, m - half, m + half)


def verdict(low: float, high: float, target) -> str:
    """``pass`` (interval inside the target), ``consistent`` (it overlaps the target),
    ``fail`` (it lies wholly on the wrong side of a threshold)."""
    if math.isnan(low) or math.isnan(high):
        return "fail"
    t_lo, t_hi, lo_strict, hi_strict = target
    if within(low, target) and within(high, target):
        return "pass"
    below = high <= t_lo if lo_strict else high < t_lo
    above = low >= t_hi if hi_strict else low > t_hi
    return "fail" if below or above else "consistent"


def _target_text(target) -> str:
    lo, hi, lo_strict, hi_strict = target
    if hi == INF:
        return f"{'>' if lo_strict else '≥'} {lo:g}"
    if lo == -INF:
        return f"{'<' if hi_strict else '≤'} {hi:g}"
    return f"in [{lo:g}, {hi:g}]"


def _stat(values, alpha: float = ALPHA, clip=None) -> dict | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    m, lo, hi = t_interval(vals, alpha)
    if clip is not None:
        lo, hi = max(lo, clip[0]), min(hi, clip[1])
    return {"mean": round(m, 4), "interval": [round(lo, 4), round(hi, 4)], "n": len(vals)}


def aggregate(per_seed: list[dict], alpha: float = ALPHA) -> dict:
    """One world's calibration over its seeds: per-seed values, mean, interval, verdict."""
    per_seed = sorted((with_checks(r) for r in per_seed), key=lambda r: r["seed"])
    first = per_seed[0]
    checks = {}
    for name, (what, target, clip) in CHECKS.items():
        vals = [r["quantities"].get(name) for r in per_seed]
        st = _stat(vals, alpha, clip)
        v = "fail" if st is None or st["n"] < len(vals) else verdict(*st["interval"], target)
        checks[name] = {"quantity": what, "target": _target_text(target),
                        "per_seed": vals, "mean": st and st["mean"],
                        "interval": st and st["interval"], "verdict": v, "ok": v != "fail"}

    def stat_of(get):
        return _stat([(get(r) or {}).get("value") for r in per_seed], alpha, ADV)

    cats = {c: {"pool_share": v["pool_share"],
                "base": stat_of(lambda r, c=c: r["categories"][c]["base"]),
                "distilled": stat_of(lambda r, c=c: r["categories"][c]["distilled"])}
            for c, v in first["categories"].items()}
    run_s = [r.get("run_seconds") for r in per_seed if r.get("run_seconds") is not None]
    return {
        "world": first["world"], "budget": first["budget"],
        "seeds": [r["seed"] for r in per_seed],
        "interval": f"two-sided {1 - alpha:.0%} Student-t interval of the mean over seeds",
        "verdict_rule": "pass: interval inside the target; consistent: interval overlaps the "
                        "target; fail: interval wholly on the wrong side (exit code 1)",
        "build_seconds": first.get("build_seconds"),
        "run_seconds": run_s,
        "mean_run_seconds": round(sum(run_s) / len(run_s), 1) if run_s else None,
        "summary": {k: stat_of(lambda r, k=k: r[k]) for k in
                    ("base_advantage", "distilled_advantage", "similarity",
                     "similarity_ceiling", "distilled_similarity")},
        "categories": cats,
        "checks": checks,
        "ok": all(c["ok"] for c in checks.values()),
        "per_seed": per_seed,
    }


def calibrate(name: str, budget: int, out: Path, seeds: list[int]) -> dict:
    """Build (or load) world ``name``, run it at every seed, and aggregate."""
    from qbudget.worlds import get_world

    t0 = time.perf_counter()
    world = get_world(name, progress=lambda m: print(m, file=sys.stderr, flush=True))
    build_s = round(time.perf_counter() - t0, 1)
    per_seed = []
    for s in seeds:
        print(f"calibration: {name} seed {s}", file=sys.stderr, flush=True)
        r = run_seed(world, name, budget, out, s)
        r["build_seconds"] = build_s
        (out / name / f"seed{s}.json").write_text(json.dumps(r, indent=2))
        per_seed.append(r)
    return aggregate(per_seed)


# --------------------------------------------------------------------------- the page

def _fmt_stat(s):
    if s is None:
        return "–"
    lo, hi = s["interval"]
    if s["n"] == 1:
        return f"{s['mean']:.3f}"
    return f"{s['mean']:.3f} [{lo:.3f}, {hi:.3f}]"


def _fmt_num(x):
    return "–" if x is None else f"{x:.3f}"


def readme_section(results: list[dict]) -> str:
    lines = [START, "",
             "World calibration (`benchmarks/world_calibration.py`, written by the script). "
             "Each figure is the mean over the seeds with its two-sided 95% Student-t "
             "interval over seeds (not the Clopper–Pearson interval of one run); a check "
             "passes when that interval lies inside its target (**pass**) or overlaps it "
             "(**consistent**), and fails only when it lies wholly on the wrong side.", ""]
    for r in results:
        build = (f"build {r['build_seconds']} s" if (r.get("build_seconds") or 0) >= 5
                 else "world already built")
        sm = r["summary"]
        seeds = ", ".join(str(s) for s in r["seeds"])
        lines += [f"**{r['world']}**, seeds {seeds} ({build}; run "
                  f"{' / '.join(f'{s:.0f}' for s in r['run_seconds'])} s per seed): advantage "
                  f"{_fmt_stat(sm['base_advantage'])} → {_fmt_stat(sm['distilled_advantage'])} "
                  f"after q = {r['budget']}; similarity {_fmt_stat(sm['similarity'])} vs "
                  f"teacher-vs-teacher {_fmt_stat(sm['similarity_ceiling'])}.", "",
                  "| check | quantity | target | per seed | mean [95% t interval] | verdict |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for k, c in r["checks"].items():
            per = ", ".join(_fmt_num(v) for v in c["per_seed"])
            ms = None if c["mean"] is None else {"mean": c["mean"], "interval": c["interval"],
                                                 "n": len(c["per_seed"])}
            v = c["verdict"] if c["verdict"] != "fail" else "**FAIL**"
            lines.append(f"| {k} | {c['quantity']} | {c['target']} | {per} | "
                         f"{_fmt_stat(ms)} | {v} |")
        lines += ["", "| category | pool share | base advantage | distilled advantage |",
                  "| --- | --- | --- | --- |"]
        for c, v in r["categories"].items():
            lines.append(f"| {c} | {v['pool_share']:.1%} | {_fmt_stat(v['base'])} | "
                         f"{_fmt_stat(v['distilled'])} |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


DOC = ROOT / "docs" / "worlds.md"


def write_doc(section: str, path: Path = DOC) -> None:
    """Replace the calibration section of ``path`` (docs/worlds.md), or append one."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if START in text and END in text:
        head, rest = text.split(START, 1)
        tail = rest.split(END, 1)[1]
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n## Calibration\n\n" + section + "\n"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


# --------------------------------------------------------------------------- CLI

def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` or ``"0-4"`` (inclusive) or a mix: ``"0-2,7"``."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-", 1)
            lo, hi = int(a), int(b)
            if hi < lo:
                raise argparse.ArgumentTypeError(f"empty seed range {part!r}")
            seeds.extend(range(lo, hi + 1))
        else:
            seeds.append(int(part))
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds needs distinct seeds, got {text!r}")
    return seeds


def load_results(paths: list[Path]) -> list[dict]:
    """Re-aggregate from JSON: this script's output (a list of worlds with ``per_seed``) or
    per-seed results (``out/WORLD/seedS.json``, one dict or a list), grouped by world."""
    by_world: dict[str, dict[int, dict]] = {}
    for p in paths:
        data = json.loads(Path(p).read_text())
        items = data if isinstance(data, list) else [data]
        for item in items:
            for r in item.get("per_seed", [item]):
                by_world.setdefault(r["world"], {})[r["seed"]] = r
    return [aggregate(list(seeds.values())) for seeds in by_world.values()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worlds", default="tiny-qwen2,tiny-llama")
    ap.add_argument("--budget", type=int, default=1000)
    ap.add_argument("--seeds", type=parse_seeds, default=None,
                    help=f"run seeds, e.g. 0,1,2 or 0-4 (default {DEFAULT_SEEDS}); the checks "
                    "are judged by a 95%% t interval over them")
    ap.add_argument("--seed", type=int, default=None,
                    help="one seed only (the old single-run calibration); same as --seeds S")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out" / "calibration")
    ap.add_argument("--doc", type=Path, default=DOC, help="page whose calibration section is "
                    "rewritten (default: docs/worlds.md)")
    ap.add_argument("--no-doc", "--no-readme", dest="no_doc", action="store_true",
                    help="only print the JSON")
    ap.add_argument("--from-json", type=Path, nargs="+", help="re-check and re-render previous "
                    "output (this script's JSON, or per-seed files out/WORLD/seedS.json) "
                    "instead of running again")
    args = ap.parse_args(argv)
    if args.seed is not None and args.seeds is not None:
        ap.error("give --seeds or --seed, not both")
    seeds = [args.seed] if args.seed is not None else (args.seeds or parse_seeds(DEFAULT_SEEDS))
    if args.from_json:
        results = load_results(args.from_json)
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        results = []
        for n in args.worlds.split(","):
            (args.out / n).mkdir(parents=True, exist_ok=True)
            results.append(calibrate(n, args.budget, args.out, seeds))
    print(json.dumps(results, indent=2))
    if not args.no_doc:
        write_doc(readme_section(results), args.doc)
    failed = [f"{r['world']}: {k}" for r in results for k, c in r["checks"].items() if not c["ok"]]
    if failed:
        print("calibration failed by its interval: " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
