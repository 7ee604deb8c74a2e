"""Write the README's benchmark section from a finished ``make bench`` sweep.

Reads ``OUT_DIR/summary.md`` (what ``qbudget bench`` writes) and, when present,
``OUT_DIR/manifest.json`` (the sweep's cell count and wall time), then:

* keeps the summary, with the sweep's facts in a first comment line, as
  ``docs/bench_summary.md`` (the full tables: per adversary, similarity, per category);
* copies ``OUT_DIR/advantage_vs_q.png`` to ``docs/bench_advantage_vs_q.png``;
* replaces the README between ``<!-- bench:start -->`` and ``<!-- bench:end -->`` with the
  figure, the max-advantage table, the paired comparisons' verdicts against the baseline
  and a conclusion from them (with the summary's note on what the seeds allow), all
  rendered from ``docs/bench_summary.md``.

So the README's table is the sweep's table, never typed by hand; ``--check`` re-renders the
section from ``docs/bench_summary.md`` and fails if the README differs.

    .venv/bin/python benchmarks/readme_bench.py OUT_DIR [--readme README.md] [--docs docs]
    .venv/bin/python benchmarks/readme_bench.py --check [--readme README.md] [--docs docs]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
SUMMARY_DOC = "bench_summary.md"
FIGURE_DOC = "bench_advantage_vs_q.png"
SWEEP_FACTS = re.compile(r"^<!-- sweep: (.*?) -->\n", re.S)


# -- reading summary.md ------------------------------------------------------------------

def _cells(line: str) -> list[str]:
    """The cells of one Markdown table row (``\\|`` is a literal bar inside a cell)."""
    parts = re.split(r"(?<!\\)\|", line.strip().strip("|"))
    return [p.strip().replace("\\|", "|") for p in parts]


def parse_summary(text: str) -> list[dict]:
    """``summary.md`` as a list of worlds: ``{"name", "intro", "sections"}``, each section
    ``{"title", "header", "rows", "lines", "foot"}`` (``lines`` = the table as written)."""
    worlds: list[dict] = []
    world = section = None
    for line in text.splitlines():
        m = re.match(r"^## World `(.+)`\s*$", line)
        if m:
            world = {"name": m.group(1), "intro": "", "sections": []}
            worlds.append(world)
            section = None
            continue
        if line.startswith("## "):  # notes, how to read: not per world
            world = section = None
            continue
        if world is None:
            continue
        if line.startswith("### "):
            section = {"title": line[4:].strip(), "header": [], "rows": [], "lines": [], "foot": ""}
            world["sections"].append(section)
        elif section is None:
            if line.strip() and not world["intro"]:
                world["intro"] = line.strip()
        elif line.startswith("|"):
            section["lines"].append(line)
            if not section["header"]:
                section["header"] = _cells(line)
            elif not re.fullmatch(r"\|?(\s*:?-+:?\s*\|)+\s*", line):
                section["rows"].append(dict(zip(section["header"], _cells(line))))
        elif line.strip() and section["lines"]:
            section["foot"] = (section["foot"] + " " + line.strip()).strip()
    return worlds


def _section(world: dict, prefix: str) -> dict | None:
    return next((s for s in world["sections"] if s["title"].startswith(prefix)), None)


# -- rendering -----------------------------------------------------------------------------

def _verdict_lines(paired: dict) -> tuple[list[str], list[str]]:
    """One bullet per strategy (each measure's difference and verdict) and the strategies
    whose verdict is anything but "not distinguishable"."""
    diff_col = next((h for h in paired["header"] if h.startswith("mean diff")), None)
    plan_col = next((h for h in paired["header"] if h.startswith("seeds for MDE")), None)
    by_strategy: dict[str, list[str]] = {}
    different: list[str] = []
    for row in paired["rows"]:
        name, measure, verdict = row.get("strategy", "?"), row.get("measure", ""), row.get("verdict", "")
        diff = f" {row[diff_col]}" if diff_col and row.get(diff_col) else ""
        plan = (f" [{plan_col.replace('seeds for MDE', 'seeds needed for an MDE of')}: {row[plan_col]}]"
                if plan_col and row.get(plan_col, "–") != "–" else "")
        by_strategy.setdefault(name, []).append(f"{measure}{diff}: {verdict}{plan}")
        if not verdict.startswith("not distinguishable"):
            different.append(f"{name} ({measure}: {verdict})")
    return [f"- **{name}**: " + "; ".join(parts) + "." for name, parts in by_strategy.items()], different


def _conclusion(world: dict, paired: dict | None, baseline: str, different: list[str]) -> str:
    m = re.search(r"\(n=(\d+)\)", world["intro"])
    seeds = f"{m.group(1)} seeds" if m else "these seeds"
    if paired is None or not paired["rows"]:
        return f"No paired comparison with a baseline at {seeds} (see the summary's notes)."
    if not different:
        return (f"**With {seeds}, no strategy is distinguishable from the baseline "
                f"`{baseline}`** on final advantage or advantage AUC.")
    return (f"**With {seeds}, distinguishable from the baseline `{baseline}`:** "
            + "; ".join(different) + ".")


def bench_section(summary_doc: str, summary_link: str = f"docs/{SUMMARY_DOC}",
                  figure_link: str = f"docs/{FIGURE_DOC}") -> str:
    """The README section (markers included) rendered from ``docs/bench_summary.md``'s text."""
    facts = SWEEP_FACTS.match(summary_doc)
    worlds = parse_summary(summary_doc)
    if not worlds:
        raise SystemExit("error: the summary holds no world section (is it a `qbudget bench` summary.md?)")
    lines = [START, f"![max advantage and similarity against q]({figure_link})", ""]
    for world in worlds:
        table = _section(world, "Max advantage")
        if table is None:
            raise SystemExit(f"error: world {world['name']}: the summary has no max-advantage table")
        lines += [f"**{table['title']}**, world `{world['name']}`:", ""] + table["lines"] + [""]
        if table["foot"]:
            lines += [table["foot"], ""]
        paired = _section(world, "Paired comparison")
        m = re.search(r"baseline '([^']+)'", paired["title"]) if paired else None
        baseline = m.group(1) if m else "baseline"
        different: list[str] = []
        if paired is not None:
            bullets, different = _verdict_lines(paired)
            lines += [f"**{paired['title']}**:", ""] + bullets + [""]
        conclusion = _conclusion(world, paired, baseline, different)
        if paired is not None and paired["foot"]:
            conclusion += " " + paired["foot"]
        lines += [conclusion, ""]
    tail = f"Full summary (every adversary, similarity, per-category residuals): [{summary_link}]({summary_link})."
    if facts:
        tail = f"Sweep: {facts.group(1)}. " + tail
    lines += [tail, END]
    return "\n".join(lines)


def replace_section(readme: str, section: str) -> str:
    if readme.count(START) != 1 or readme.count(END) != 1 or readme.index(START) > readme.index(END):
        raise SystemExit(f"error: the README needs exactly one {START} ... {END} pair")
    head, rest = readme.split(START, 1)
    return head + section + rest.split(END, 1)[1]


def current_section(readme: str) -> str:
    head, rest = readme.split(START, 1)
    return START + rest.split(END, 1)[0] + END


def sweep_facts(out_dir: Path) -> str | None:
    """``12 cells, 192 s wall time`` from the sweep's manifest (None without one)."""
    path = out_dir / "manifest.json"
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text(encoding="utf-8"))
    cells = len(manifest.get("cells", []))
    parts = [f"{cells} cells"]
    if manifest.get("seconds") is not None:
        parts.append(f"{manifest['seconds']:.0f} s wall time")
    if manifest.get("skipped_cells"):
        parts.append(f"of which {manifest['skipped_cells']} finished in an earlier, resumed run")
    return ", ".join(parts)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir", type=Path, nargs="?", help="a finished `qbudget bench` directory")
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs",
                    help=f"where {SUMMARY_DOC} and {FIGURE_DOC} go")
    ap.add_argument("--check", action="store_true",
                    help=f"only re-render from DOCS/{SUMMARY_DOC} and compare with the README")
    args = ap.parse_args(argv)
    readme = args.readme.read_text(encoding="utf-8")
    summary_path = args.docs / SUMMARY_DOC
    if args.check:
        if not summary_path.is_file():
            print(f"error: {summary_path} not found", file=sys.stderr)
            return 2
        want = bench_section(summary_path.read_text(encoding="utf-8"))
        if current_section(readme) != want:
            print(f"{args.readme}: bench section differs from what {summary_path} renders; "
                  f"run benchmarks/readme_bench.py OUT_DIR", file=sys.stderr)
            return 1
        return 0
    if args.out_dir is None:
        ap.error("OUT_DIR is required (or --check)")
    summary_md = args.out_dir / "summary.md"
    figure = args.out_dir / "advantage_vs_q.png"
    for path in (summary_md, figure):
        if not path.is_file():
            print(f"error: {path} not found (is {args.out_dir} a finished `qbudget bench` "
                  "directory?)", file=sys.stderr)
            return 2
    facts = sweep_facts(args.out_dir)
    doc = (f"<!-- sweep: {facts} -->\n" if facts else "") + summary_md.read_text(encoding="utf-8")
    section = bench_section(doc)  # fails before anything is written if the summary is unusable
    args.docs.mkdir(parents=True, exist_ok=True)
    _write(summary_path, doc)
    shutil.copyfile(figure, args.docs / FIGURE_DOC)
    _write(args.readme, replace_section(readme, section))
    print(f"{args.readme}: bench section written from {summary_md}; "
          f"{summary_path} and {args.docs / FIGURE_DOC} updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
