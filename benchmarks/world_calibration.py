"""World calibration: do the embedded worlds behave like the study's worlds?

For each world: the base student against the teacher on the full 5,000-prompt probe
(q = 0), and the student after LoRA distillation on 1,000 random pool prompts
(q = 1000), both measured through the product path (``qbudget.loop.Run`` with the
``random`` strategy, the default adversaries, and the distillation settings and round
size of ``benchmarks/default.toml``). Checks (issue 3):

* semantic similarity of the base student clearly below teacher-vs-teacher;
* best default adversary's advantage (all categories) between 0.25 and 0.85;
* after distillation the best adversary's advantage (all categories) is at least
  halved, while its lower confidence bound is still > 0 in style-format, robustness and
  domain-technical (residual gaps where the study found them);
* the categories with the largest base gaps include a rare category (pool share <= 3%).

Prints one JSON object and writes the figures into docs/worlds.md (``--doc``) between the
``<!-- calibration:start -->`` and ``<!-- calibration:end -->`` markers.

    .venv/bin/python benchmarks/world_calibration.py [--worlds tiny-qwen2,tiny-llama]
        [--budget 1000] [--out bench-out/calibration] [--doc docs/worlds.md] [--no-doc]
        [--from-json FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOCUS = ("style-format", "robustness", "domain-technical")
START, END = "<!-- calibration:start -->", "<!-- calibration:end -->"


def _row(df, q, metric, category="all", adversary=None):
    sel = df[(df.q == q) & (df.metric == metric) & (df.category == category)]
    if adversary is not None:
        sel = sel[sel.adversary == adversary]
    if sel.empty:
        return None
    r = sel.iloc[0]
    return {"value": round(float(r.value), 4), "ci_low": round(float(r.ci_low), 4),
            "ci_high": round(float(r.ci_high), 4)}


def calibrate(name: str, budget: int, out: Path, seed: int) -> dict:
    from qbudget.config import BudgetConfig, RunConfig, StrategyConfig, load_bench_config
    from qbudget.loop import Run
    from qbudget.results import read_results
    from qbudget.worlds import get_world
    from qbudget.worlds.specs import POOL_SHARES

    t0 = time.perf_counter()
    world = get_world(name, progress=lambda m: print(m, file=sys.stderr, flush=True))
    build_s = time.perf_counter() - t0
    # distillation as `make bench` runs it (benchmarks/default.toml), on the full probe
    bench = load_bench_config(ROOT / "benchmarks" / "default.toml")
    cfg = RunConfig(world=name, strategy=StrategyConfig("random", {}),
                    budget=BudgetConfig(total=budget, round_size=bench.run.budget.round_size,
                                        checkpoints=(0, budget)),
                    distill=bench.run.distill, seed=seed)
    run_dir = out / name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    t1 = time.perf_counter()
    Run(cfg, run_dir).execute()
    run_s = time.perf_counter() - t1
    df = read_results(run_dir)

    base = _row(df, 0, "advantage", adversary="max")
    sim = _row(df, 0, "similarity")
    ceiling = _row(df, 0, "similarity_ceiling")
    per_cat = {}
    for c in world.categories:
        a0 = _row(df, 0, "advantage", c, "max")
        a1 = _row(df, budget, "advantage", c, "max")
        per_cat[c] = {"pool_share": POOL_SHARES.get(c), "base": a0, "distilled": a1}
    result = {
        "world": name, "seed": seed, "budget": budget,
        "build_seconds": round(build_s, 1), "run_seconds": round(run_s, 1),
        "base_advantage": base,
        "distilled_advantage": _row(df, budget, "advantage", adversary="max"),
        "similarity": sim, "similarity_ceiling": ceiling,
        "distilled_similarity": _row(df, budget, "similarity"),
        "categories": per_cat,
    }
    return with_checks(result)


def with_checks(r: dict) -> dict:
    """Add ``largest_base_gaps`` and ``checks`` (issue 3's calibration targets) to a result."""
    per_cat, base, sim, ceiling = r["categories"], r["base_advantage"], r["similarity"], r["similarity_ceiling"]
    after = r["distilled_advantage"]
    ranked = sorted(per_cat, key=lambda c: -(per_cat[c]["base"] or {"value": 0})["value"])
    top = ranked[:3]
    residual = {c: bool(per_cat[c]["distilled"] and per_cat[c]["distilled"]["ci_low"] > 0)
                for c in FOCUS}
    r["largest_base_gaps"] = top
    r["checks"] = {
        "similarity_below_ceiling": bool(sim and ceiling and sim["value"] < ceiling["value"] - 0.01),
        "base_advantage_in_range": bool(base and 0.25 <= base["value"] <= 0.85),
        "distilled_advantage_halved": bool(base and after and after["value"] <= base["value"] / 2),
        "residual_lower_bound_above_0": residual,
        "rare_category_among_top_gaps": any((per_cat[c]["pool_share"] or 1) <= 0.03 for c in top),
    }
    return r


def _fmt(r):
    return "–" if r is None else f"{r['value']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"


def readme_section(results: list[dict]) -> str:
    lines = [START, "",
             "World calibration (`benchmarks/world_calibration.py`, written by the script): "
             "best default adversary's advantage of the base student (q = 0) and after LoRA "
             "distillation on random pool prompts (q = budget), with 95% Clopper–Pearson "
             "intervals.", ""]
    for r in results:
        build = (f"build {r['build_seconds']} s" if r["build_seconds"] >= 5
                 else "world already built")
        lines += [f"**{r['world']}** ({build}, run {r['run_seconds']} s): "
                  f"advantage {_fmt(r['base_advantage'])} → {_fmt(r['distilled_advantage'])} "
                  f"after q = {r['budget']}; similarity {_fmt(r['similarity'])} vs "
                  f"teacher-vs-teacher {_fmt(r['similarity_ceiling'])}.", "",
                  "| category | pool share | base advantage | distilled advantage |",
                  "| --- | --- | --- | --- |"]
        for c, v in r["categories"].items():
            lines.append(f"| {c} | {v['pool_share']:.1%} | {_fmt(v['base'])} | {_fmt(v['distilled'])} |")
        checks = r["checks"]
        lines += ["", "Checks: " + ", ".join(
            f"{k}={'pass' if (all(v.values()) if isinstance(v, dict) else v) else 'FAIL'}"
            for k, v in checks.items()), ""]
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worlds", default="tiny-qwen2,tiny-llama")
    ap.add_argument("--budget", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out" / "calibration")
    ap.add_argument("--doc", type=Path, default=DOC, help="page whose calibration section is "
                    "rewritten (default: docs/worlds.md)")
    ap.add_argument("--no-doc", "--no-readme", dest="no_doc", action="store_true",
                    help="only print the JSON")
    ap.add_argument("--from-json", type=Path, help="re-check and re-render a previous run's JSON "
                    "output instead of running again")
    args = ap.parse_args(argv)
    if args.from_json:
        results = [with_checks(r) for r in json.loads(args.from_json.read_text())]
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        results = [calibrate(n, args.budget, args.out, args.seed) for n in args.worlds.split(",")]
    print(json.dumps(results, indent=2))
    if not args.no_doc:
        write_doc(readme_section(results), args.doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
