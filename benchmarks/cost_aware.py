"""Cost-aware acquisition on an embedded world: the same dollars, two ways to spend them.

Runs ``benchmarks/cost_aware.toml`` (uncertainty vs ``cost_aware`` wrapping it, a dollar
cap that binds before the query cap), then compares, per seed, what each strategy bought
with the money and how distinguishable its student is where the money ran out: the max
advantage at the run's last evaluation (its stopping point), paired on seed with the
sign-flip test and its minimum detectable difference (``qbudget.paired``). Prints JSON and,
with ``--docs DIR``, writes the advantage-vs-usd figure (``qbudget plot --x usd``) and the
JSON there, and the README's section between ``<!-- cost:start -->`` and
``<!-- cost:end -->`` rendered from that JSON (``--check`` re-renders it from
``docs/cost_aware.json`` and fails if the README differs).

    .venv/bin/python benchmarks/cost_aware.py OUT_DIR [--docs docs] [--readme README.md] [--reuse]
    .venv/bin/python benchmarks/cost_aware.py --check [--docs docs] [--readme README.md]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "benchmarks" / "cost_aware.toml"
START, END = "<!-- cost:start -->", "<!-- cost:end -->"


def render(report: dict) -> str:
    """The README section: what the same dollars bought, and the paired verdict."""
    u, c, p = (report["strategies"]["uncertainty"], report["strategies"]["cost_aware"],
               report["paired"])
    n = len(u["seeds"])
    lines = [
        "![max advantage against dollars spent](docs/cost_aware_vs_usd.png)", "",
        "| strategy | queries bought | US$ per 1,000 queries | max advantage where the money ran out |",
        "|---|---|---|---|"]
    for name, r in (("uncertainty", u), ("cost_aware (uncertainty per dollar)", c)):
        lines.append(f"| {name} | {r['mean_q']:.0f} | {1000 * r['usd_per_query']:.4f} | "
                     f"{r['mean_advantage']:.3f} |")
    mde = "n/a" if p["mde"] is None else f"{p['mde']:.3f}"
    lines += ["", f"Same dollars (US$ {u['mean_usd']:.4f} per run, {n} seeds, "
              f"`benchmarks/cost_aware.toml` on `micro`): ranking by uncertainty per expected "
              f"dollar bought {report['queries_per_dollar_ratio']:.2f}× the queries; the "
              f"advantage where the money ran out differs by {p['mean_diff']:+.3f} "
              f"(95% CI {p['ci'][0]:+.3f} to {p['ci'][1]:+.3f}, sign-flip p = "
              f"{p['p_value']:.3f}, detectable at these seeds: {mde}): {p['verdict']}."]
    return "\n".join(lines)


def write_readme(readme: Path, report: dict, check: bool = False) -> int:
    text = readme.read_text()
    if START not in text or END not in text:
        print(f"{readme}: no {START} ... {END} section", file=sys.stderr)
        return 2
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{render(report)}\n{END}{tail}"
    if check:
        if new != text:
            print(f"{readme}: the cost-aware section differs from docs/cost_aware.json "
                  "(re-run benchmarks/cost_aware.py)", file=sys.stderr)
            return 1
        return 0
    readme.write_text(new)
    return 0


def analyse(out: Path) -> dict:
    import numpy as np

    from qbudget.paired import permutation_compare
    from qbudget.results import read_results

    df = read_results(out)
    head = df[(df.metric == "advantage") & (df.adversary == "max") & (df.category == "all")]
    last = head.loc[head.groupby(["strategy", "seed"])["q"].idxmax()]
    per = {s: g.set_index("seed") for s, g in last.groupby("strategy")}
    report = {"world": sorted(df.world.unique().tolist()), "strategies": {}}
    for s, g in per.items():
        report["strategies"][s] = {
            "seeds": [int(x) for x in g.index],
            "q_bought": [int(x) for x in g["q"]],
            "usd_spent": [round(float(x), 6) for x in g["usd"]],
            "tokens_spent": [int(x) for x in g["tokens"]],
            "final_max_advantage": [round(float(x), 4) for x in g["value"]],
            "mean_q": float(np.mean(g["q"])), "mean_usd": float(np.mean(g["usd"])),
            "mean_advantage": float(np.mean(g["value"])),
            "usd_per_query": float(np.sum(g["usd"]) / np.sum(g["q"])),
        }
    base, other = per["uncertainty"], per["cost_aware"]
    common = sorted(set(base.index) & set(other.index))
    diffs = [float(other.loc[s, "value"] - base.loc[s, "value"]) for s in common]
    r = permutation_compare(diffs, rng=np.random.default_rng(0), what="final advantage")
    report["paired"] = {"measure": "max advantage where the dollars ran out, cost_aware − "
                                   "uncertainty", "n": r.n, "mean_diff": round(r.mean_diff, 4),
                        "ci": [round(r.ci_low, 4), round(r.ci_high, 4)],
                        "p_value": round(r.p_value, 4), "mde": (None if r.mde == float("inf")
                                                                else round(r.mde, 4)),
                        "verdict": r.verdict}
    q_ratio = report["strategies"]["cost_aware"]["mean_q"] / report["strategies"]["uncertainty"]["mean_q"]
    report["queries_per_dollar_ratio"] = round(q_ratio, 3)
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, nargs="?")
    ap.add_argument("--docs", type=Path, default=None)
    ap.add_argument("--readme", type=Path, default=None)
    ap.add_argument("--reuse", action="store_true", help="analyse an existing sweep in OUT")
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    if args.check:
        docs = args.docs or ROOT / "docs"
        report = json.loads((docs / "cost_aware.json").read_text())
        return write_readme(args.readme or ROOT / "README.md", report, check=True)
    if args.out is None:
        ap.error("OUT is required (or --check)")
    t0 = time.perf_counter()
    if not args.reuse:
        if args.out.exists():
            shutil.rmtree(args.out)
        subprocess.run([sys.executable, "-m", "qbudget", "bench", str(CONFIG), "--out",
                        str(args.out), "--quiet"], check=True)
    report = analyse(args.out)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    if args.docs is not None:
        subprocess.run([sys.executable, "-m", "qbudget", "plot", str(args.out), "--x", "usd",
                        "--baseline", "uncertainty", "--out",
                        str(args.docs / "cost_aware_vs_usd.png")], check=True)
        (args.docs / "cost_aware.json").write_text(json.dumps(report, indent=1) + "\n")
    if args.readme is not None:
        write_readme(args.readme, report)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
