"""Figures (plot_results), the terminal plot and ``qbudget plot``: valid files, errors → exit 2."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pandas as pd
import pytest
from typer.testing import CliRunner

from qbudget.cli import app
from qbudget.errors import QBudgetError
from qbudget.plotting import plot_results
from qbudget.results import write_results
from qbudget.termplot import MARKERS, render_curves
from test_summary import SHAPES, synthetic_results

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def df():
    return synthetic_results(seeds=(0, 1))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, df):
    """A sweep directory whose cells hold the synthetic rows (no merged file yet)."""
    root = tmp_path_factory.mktemp("sweep")
    for run_id, rows in df.groupby("run_id"):
        write_results(root / "cells" / run_id / "results.parquet", rows.to_dict("records"))
    return root


def assert_png(path, min_bytes=20_000):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > min_bytes, (path, len(data))


def assert_svg(path, min_bytes=20_000):
    assert path.stat().st_size > min_bytes
    root = ET.parse(path).getroot()
    assert root.tag.endswith("svg")
    return path.read_text()


def test_headline_png_svg_pdf(tmp_path, df):
    assert_png(plot_results(df, tmp_path / "a.png", epsilon=0.3))
    svg = assert_svg(plot_results(df, tmp_path / "a.svg", epsilon=0.3))
    for s in SHAPES:  # one legend entry per strategy
        assert s in svg
    assert "ε = 0.3" in svg and "similarity to teacher" in svg and "teacher vs teacher" in svg
    pdf = plot_results(df, tmp_path / "a.pdf").read_bytes()
    assert pdf[:5] == b"%PDF-" and len(pdf) > 5_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pdf", "a.png", "a.svg"]


def test_advantage_against_dollars_places_points_at_the_spend(tmp_path, df):
    """--x usd: each checkpoint sits at the mean over seeds of the dollars spent by then
    (here a strategy paying twice as much per query has its points twice as far right)."""
    import matplotlib

    paid = df.copy()
    per_query = {s: (2e-5 if i == 0 else 1e-5) for i, s in enumerate(sorted(paid.strategy.unique()))}
    paid["usd"] = [q * per_query[s] for q, s in zip(paid["q"], paid["strategy"])]
    paid["tokens"] = paid["q"] * 40
    svg = assert_svg(plot_results(paid, tmp_path / "usd.svg", x="usd"))
    assert "US$ spent on training purchases" in svg
    from qbudget.plotting import _curve

    head = paid[(paid.metric == "advantage") & (paid.adversary == "max") & (paid.category == "all")]
    for s, rate in per_query.items():
        c = _curve(head[head.strategy == s], "usd")
        assert list(c["x"]) == pytest.approx([q * rate for q in c["q"]])
    assert matplotlib.get_backend()   # drawn off-screen, no display needed
    with pytest.raises(QBudgetError, match="no 'usd' values"):
        plot_results(df.assign(usd=float("nan")), tmp_path / "none.png", x="usd")
    with pytest.raises(QBudgetError, match="unknown x axis"):
        plot_results(paid, tmp_path / "bad.png", x="eur")


def test_facets_by_category_and_adversary(tmp_path, df):
    svg = assert_svg(plot_results(df, tmp_path / "c.svg", by="category", epsilon=0.2))
    for cat in ("all", "math", "code", "chat"):
        assert f"category {cat}" in svg
    svg = assert_svg(plot_results(df, tmp_path / "d.svg", by="adversary"))
    for adv in ("max", "ngram", "embed"):
        assert f"adversary {adv}" in svg
    svg = assert_svg(plot_results(df, tmp_path / "e.svg", metric="similarity", by="category"),
                     min_bytes=10_000)
    assert "semantic similarity by category" in svg


def test_several_worlds_give_one_row_each_and_facets_need_a_world(tmp_path):
    two = synthetic_results(worlds=("tiny", "other"), seeds=(0,), qs=(0, 64, 256))
    svg = assert_svg(plot_results(two, tmp_path / "w.svg"))
    assert "tiny: max adversary" in svg and "other: max adversary" in svg
    with pytest.raises(QBudgetError, match="several worlds"):
        plot_results(two, tmp_path / "f.png", by="category")
    svg = assert_svg(plot_results(two, tmp_path / "g.svg", by="category", world="other"))
    assert "other: distinguishing advantage by category" in svg


@pytest.mark.parametrize("kwargs, out, match", [
    ({}, "fig.jpg", "use a .png, .svg or .pdf"),
    ({}, "fig", "use a .png, .svg or .pdf"),
    ({"metric": "loss"}, "fig.png", "unknown metric 'loss'"),
    ({"by": "seed"}, "fig.png", "unknown facet"),
    ({"world": "nope"}, "fig.png", "world 'nope' is not in the results"),
    ({"metric": "similarity", "by": "adversary"}, "fig.png", "has no adversaries"),
    ({"epsilon": 2.0}, "fig.png", "epsilon"),
])
def test_bad_plot_requests(tmp_path, df, kwargs, out, match):
    with pytest.raises(QBudgetError, match=match):
        plot_results(df, tmp_path / out, **kwargs)
    assert not any(tmp_path.iterdir())
    with pytest.raises(QBudgetError, match="no result rows"):
        plot_results(df.iloc[0:0], tmp_path / "x.png")


def test_terminal_plot_places_points_and_names_every_strategy(df):
    text = render_curves(df)
    assert "world tiny" in text and "[" not in text
    for mark, s in zip(MARKERS, sorted(SHAPES)):
        assert f"{mark} {s}" in text
    ascii_text = render_curves(df, ascii_only=True, width=40, height=8)
    assert ascii_text.isascii()
    assert max(len(line) for line in ascii_text.splitlines()[1:-1]) <= 6 + 40 + 4  # canvas
    # one strategy from 1.0 at q=0 to 0.0 at q=255: top-left and bottom-right of the canvas
    line = pd.DataFrame([{"world": "w", "strategy": "s", "seed": 0, "q": q, "metric": "advantage",
                          "adversary": "max", "category": "all", "value": v}
                         for q, v in ((0, 1.0), (15, 0.5), (255, 0.0))])
    rows = render_curves(line, ascii_only=True, width=20, height=5).splitlines()
    canvas = [r[6:] for r in rows[1:6]]
    assert canvas[0].startswith("o") and canvas[-1].endswith("o")
    assert canvas[2][9:11].strip("o") == "" and "o" in canvas[2]  # q=15 is half-way on log2(q+1)
    assert rows[7].split() == ["0", "15", "255"]
    assert render_curves(line[line.metric == "similarity"]) == "(no advantage rows to plot)"


def invoke(*args):
    return CliRunner().invoke(app, ["plot", *map(str, args)])


def test_plot_cli_writes_figures_from_a_sweep_dir(tmp_path, sweep):
    out = tmp_path / "figs" / "adv.png"
    r = invoke(sweep, "--out", out, "--epsilon", 0.25)
    assert r.exit_code == 0, r.output
    assert f"wrote {out}" in r.stdout
    assert_png(out)
    out = tmp_path / "cat.svg"
    r = invoke(sweep, "--by", "category", "--world", "tiny", "--metric", "advantage", "--out", out)
    assert r.exit_code == 0, r.output
    assert "category code" in assert_svg(out)
    out = tmp_path / "sim.pdf"
    r = invoke(sweep / "cells" / "tiny__random__seed0" / "results.parquet", "--metric",
               "similarity", "--out", out)
    assert r.exit_code == 0, r.output
    assert out.read_bytes()[:5] == b"%PDF-"


@pytest.mark.parametrize("args, match", [
    (["{missing}", "--out", "{tmp}/a.png"], "does not exist"),
    (["{empty}", "--out", "{tmp}/a.png"], "no results in"),
    (["{sweep}", "--out", "{tmp}/a.gif"], "--out must end in .png, .svg or .pdf"),
    (["{sweep}", "--metric", "loss", "--out", "{tmp}/a.png"], "unknown --metric 'loss'"),
    (["{sweep}", "--by", "seed", "--out", "{tmp}/a.png"], "unknown --by 'seed'"),
    (["{sweep}", "--world", "nope", "--out", "{tmp}/a.png"], "world 'nope'"),
])
def test_plot_cli_failures_exit_2_with_one_line(tmp_path, sweep, args, match):
    (tmp_path / "empty").mkdir()
    subst = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "sweep": sweep,
             "tmp": tmp_path}
    r = invoke(*[a.format(**subst) for a in args])
    assert r.exit_code == 2, r.output
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
    assert match in r.stderr
    assert "Traceback" not in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
