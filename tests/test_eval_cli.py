"""`qbudget eval --teacher/--student` on hand-written answer files."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from qbudget.cli import app

TOPICS = ["rivers", "stars", "bread", "music", "trains", "rain", "cats", "chess", "tea", "owls"]
CATS = ["facts", "chat", "howto"]


def _write(path, responses, split=None):
    with open(path, "w", encoding="utf-8") as fh:
        for i, r in enumerate(responses):
            row = {"id": f"q{i}", "prompt": f"Tell me about {TOPICS[i % 10]} #{i}.",
                   "category": CATS[i % 3], "response": r}
            if split is not None:
                row["split"] = split[i]
            fh.write(json.dumps(row) + "\n")
    return str(path)


N = 90
TEACHER = [f"Certainly! Here is a fact about {TOPICS[i % 10]}: they matter, number {i % 7}."
           for i in range(N)]
STUDENT = [f"{TOPICS[i % 10]} r cool lol {i % 5}" for i in range(N)]


def _invoke(*args):
    return CliRunner().invoke(app, ["eval", *args])


def _rows(result, adversary, metric="advantage", category="all"):
    rows = json.loads(result.stdout)
    return [r for r in rows if r["adversary"] == adversary and r["metric"] == metric
            and r["category"] == category]


@pytest.mark.slow
def test_systematic_difference_is_detected(tmp_path):
    t = _write(tmp_path / "t.jsonl", TEACHER)
    s = _write(tmp_path / "s.jsonl", STUDENT)
    res = _invoke("--teacher", t, "--student", s, "--json", "--seed", "3")
    assert res.exit_code == 0, res.output
    for adversary in ("ngram", "embed", "pairwise", "max"):
        (row,) = _rows(res, adversary)
        assert row["value"] >= 0.9 and row["ci_low"] > 0, row
    (sim,) = _rows(res, "", metric="similarity")
    assert sim["value"] < 0.9 and sim["n"] == N
    per_cat = [r for r in json.loads(res.stdout) if r["metric"] == "advantage"
               and r["adversary"] == "ngram" and r["category"] != "all"]
    assert sum(r["n"] for r in per_cat) == _rows(res, "ngram")[0]["n"]


def test_identical_files_are_indistinguishable_and_table_and_verdict(tmp_path):
    split = ["train" if i < 60 else "test" for i in range(N)]
    t = _write(tmp_path / "t.jsonl", TEACHER, split)
    s = _write(tmp_path / "s.jsonl", TEACHER, split)
    res = _invoke("--teacher", t, "--student", s, "--json", "--adversaries", "ngram")
    assert res.exit_code == 0, res.output
    (row,) = _rows(res, "ngram")
    assert row["value"] == 0.0 and row["ci_low"] < 0 < row["ci_high"]
    assert row["n"] == 2 * 30  # the explicit split: 30 test prompts, two answers each
    (sim,) = _rows(res, "", metric="similarity")
    assert sim["value"] == pytest.approx(1.0, abs=1e-5)
    res = _invoke("--teacher", t, "--student", s, "--adversaries", "ngram", "--epsilon", "0.5")
    assert res.exit_code == 0, res.output
    assert "advantage" in res.stdout and "ngram" in res.stdout
    assert "indistinguishable at epsilon=0.5" in res.stdout


def _error(res):
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


def test_bad_files_exit_2_with_one_line(tmp_path):
    t = _write(tmp_path / "t.jsonl", TEACHER)
    s_short = _write(tmp_path / "s_short.jsonl", STUDENT[:-1])
    assert "do not match" in _error(_invoke("--teacher", t, "--student", s_short))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "q0", "prompt": "x", "category": "c", "response": "y"}\n{oops\n')
    assert "bad.jsonl:2: malformed JSON" in _error(_invoke("--teacher", t, "--student", str(bad)))
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"id": "q0", "prompt": "x", "category": "c"}\n')
    assert "field 'response'" in _error(_invoke("--teacher", str(nofield), "--student", t))
    assert "not found" in _error(_invoke("--teacher", str(tmp_path / "nope.jsonl"),
                                         "--student", t))
    badsplit = _write(tmp_path / "split.jsonl", TEACHER, ["dev"] * N)
    assert "'split' must be" in _error(_invoke("--teacher", badsplit, "--student", t))
    alltrain = _write(tmp_path / "alltrain.jsonl", TEACHER, ["train"] * N)
    assert "at least one 'train' and one 'test'" in _error(
        _invoke("--teacher", alltrain, "--student", alltrain))
    assert "unknown adversary 'gpt'" in _error(
        _invoke("--teacher", t, "--student", t, "--adversaries", "gpt"))
    assert "--teacher and --student" in _error(_invoke("--teacher", t))
    assert "nothing to evaluate" in _error(_invoke())
    assert "--t must be at least 1" in _error(_invoke("--teacher", t, "--student", t, "--t", "0"))
    assert "sample bound q=1000" in _error(
        _invoke("--teacher", t, "--student", t, "--adversaries", "ngram", "--q", "1000"))


def test_world_mode_refuses_bad_input_with_one_line(tmp_path):
    assert "world" in _error(_invoke("--world", "no-such-world", "--adversaries", "ngram"))
    t = _write(tmp_path / "t.jsonl", TEACHER)
    assert "either --world or --teacher" in _error(
        _invoke("--world", "micro", "--teacher", t, "--student", t))
    assert "--adapter only applies with --world" in _error(
        _invoke("--teacher", t, "--student", t, "--adapter", str(tmp_path)))


# -- --world with --adapter: the adapter is really applied --------------------------------

WORLD_ARGS = ["--world", "micro", "--adversaries", "ngram", "--probe-subset", "60", "--json"]


def _world_rows(*extra):
    res = _invoke(*WORLD_ARGS, *extra)
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    return {(r["metric"], r["adversary"], r["category"]): r for r in rows}


def _adapter(micro, folder, scale: float):
    """A PEFT adapter for micro's student: fresh (B = 0) if ``scale`` is 0, else every LoRA
    weight moved by ``scale`` x N(0, 1) noise."""
    import jax
    from flax import nnx

    from qbudget.models import CausalLM
    from qbudget.models.lora import attach_lora, save_adapter

    model = attach_lora(CausalLM.from_pretrained(micro.student_dir), rank=4, alpha=8,
                        key=jax.random.key(1))
    lora = nnx.state(model, nnx.LoRAParam)
    leaves, treedef = jax.tree.flatten(lora)
    assert leaves and any(not np.asarray(x).any() for x in leaves)     # B starts at zero
    if scale:
        keys = jax.random.split(jax.random.key(2), len(leaves))
        nnx.update(model, jax.tree.unflatten(
            treedef, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]))
    save_adapter(model, folder, str(micro.student_dir))
    return folder


@pytest.mark.slow
def test_world_mode_applies_the_adapter(micro_world, tmp_path):
    base = _world_rows()
    zero = _world_rows("--adapter", str(_adapter(micro_world, tmp_path / "zero", 0.0)))
    moved = _world_rows("--adapter", str(_adapter(micro_world, tmp_path / "moved", 0.5)))
    # an adapter that computes the identity leaves every row exactly as the base student's
    assert zero == base
    # one with non-zero weights changes the student's answers, hence the measured rows
    assert set(moved) == set(base)
    sim = ("similarity", "", "all")
    assert base[sim]["n"] == moved[sim]["n"] == 60
    assert moved[sim]["value"] != base[sim]["value"]
    changed = [k for k in base if k[0] in ("similarity", "advantage")
               and moved[k]["value"] != base[k]["value"]]
    assert len(changed) >= 2, changed


# -- mmd: a two-sample test (p-values), not a classifier (advantage) ------------------------

def _write_rows(path, rows):
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return str(path)


def _mmd_files(tmp_path):
    """90 prompts in three categories plus one 'solo' prompt; the student answers like the
    teacher except in 'facts', so only 'facts' (and 'all') differ, and 'solo' has one
    prompt, too few for a two-sample test."""
    teacher, student = [], []
    for i in range(N + 1):
        cat = CATS[i % 3] if i < N else "solo"
        base = {"id": f"q{i}", "prompt": f"Tell me about {TOPICS[i % 10]} #{i}.",
                "category": cat, "split": "train" if i < 60 else "test"}
        teacher.append({**base, "response": TEACHER[i % N]})
        student.append({**base, "response": STUDENT[i % N] if cat == "facts" else TEACHER[i % N]})
    return (_write_rows(tmp_path / "t.jsonl", teacher), _write_rows(tmp_path / "s.jsonl", student))


def _table_cells(text: str, title: str) -> dict[str, dict[str, str]]:
    """A rich table of ``text`` whose title starts with ``title``: row -> column -> the
    cell's lines joined by spaces."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(title))
    header = next(i for i in range(start, len(lines)) if lines[i].startswith("┃"))
    cols = [c.strip() for c in lines[header].strip("┃").split("┃")]
    body, name = {}, None
    for line in lines[header + 2:]:
        if line.startswith("└"):
            break
        cells = [c.strip() for c in line.strip("│").split("│")]
        name = cells[0] or name
        row = body.setdefault(name, {c: "" for c in cols[1:]})
        for c, v in zip(cols[1:], cells[1:]):
            row[c] = (row[c] + " " + v).strip()
    return body


WIDE = {"COLUMNS": "200"}


def test_epsilon_with_only_mmd_is_refused_up_front(tmp_path):
    t, s = _mmd_files(tmp_path)
    line = _error(_invoke("--teacher", t, "--student", s, "--adversaries", "mmd",
                          "--epsilon", "0.5"))
    assert "--epsilon needs a classifier adversary" in line
    assert "mmd is a two-sample test with a p-value, not an advantage to certify" in line
    # up front: before the world is even looked up
    line = _error(_invoke("--world", "no-such-world", "--adversaries", "mmd", "--epsilon", "0.5"))
    assert "mmd is a two-sample test" in line
    assert "--epsilon must be in (0, 1]" in _error(
        _invoke("--teacher", t, "--student", s, "--adversaries", "ngram", "--epsilon", "0"))


def test_mmd_p_values_in_the_table_and_beside_the_classifier_verdict(tmp_path):
    t, s = _mmd_files(tmp_path)
    args = ["--teacher", t, "--student", s, "--adversaries", "ngram,mmd"]
    res = CliRunner().invoke(app, ["eval", *args, "--json", "--epsilon", "0.5"], env=WIDE)
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)            # the verdict goes to stderr: stdout stays JSON
    assert "at epsilon=0.5" in res.stderr
    mmd = {r["category"]: r for r in rows if r["adversary"] == "mmd" and r["metric"] == "p_value"}
    stat = {r["category"]: r for r in rows
            if r["adversary"] == "mmd" and r["metric"] == "mmd_statistic"}
    assert set(mmd) == {"all", "facts", "chat", "howto"}        # 'solo': one prompt, no test
    assert mmd["facts"]["value"] < 0.01 and mmd["chat"]["value"] > 0.5
    assert not [r for r in rows if r["adversary"] == "mmd" and r["metric"] == "advantage"]
    (ngram,) = [r for r in rows if r["adversary"] == "ngram" and r["metric"] == "advantage"
                and r["category"] == "all"]

    res = CliRunner().invoke(app, ["eval", *args, "--epsilon", "0.5"], env=WIDE)
    assert res.exit_code == 0, res.output
    table = _table_cells(res.stdout, "two-sample tests")
    assert set(table) == {"mmd"}
    for cat, r in mmd.items():
        assert table["mmd"][cat] == (f"p={r['value']:.2g} MMD²={stat[cat]['value']:.3g} "
                                     f"n={r['n']}"), (cat, table)
    assert table["mmd"]["solo"] == "—"
    assert "mmd" not in _table_cells(res.stdout, "advantage 2·acc−1")
    # the ε verdict judges ngram only, with mmd's overall p-value beside it
    word = "indistinguishable" if ngram["ci_high"] <= 0.5 else "distinguishable"
    assert (f"{word} at epsilon=0.5: largest advantage upper bound {ngram['ci_high']:.3f} "
            f"(ngram); mmd: two-sample test p={mmd['all']['value']:.2g} (n={mmd['all']['n']}), "
            "no advantage, not judged") in res.stdout
    # identical answers: indistinguishable to ngram, and mmd's p is reported, not judged
    res = CliRunner().invoke(app, ["eval", "--teacher", t, "--student", t, "--adversaries",
                                   "mmd,ngram", "--epsilon", "0.5"], env=WIDE)
    assert res.exit_code == 0, res.output
    assert "indistinguishable at epsilon=0.5" in res.stdout
    assert "(ngram); mmd: two-sample test p=1 (n=91)" in res.stdout


def test_crossfit_scores_every_prompt_and_refuses_too_few_folds(tmp_path):
    """60 train / 30 test prompts: --crossfit 3 cuts the train split into two more folds of
    30, so every one of the 90 prompts is scored by an ngram adversary trained on 60."""
    split = ["train" if i < 60 else "test" for i in range(N)]
    t = _write(tmp_path / "t.jsonl", TEACHER, split)
    s = _write(tmp_path / "s.jsonl", STUDENT, split)
    res = _invoke("--teacher", t, "--student", s, "--json", "--adversaries", "ngram",
                  "--crossfit", "3")
    assert res.exit_code == 0, res.output
    (row,) = _rows(res, "ngram")
    assert row["n"] == 2 * N and row["value"] >= 0.9
    assert _rows(res, "ngram", metric="adversary_folds")[0]["value"] == 3
    assert _rows(res, "ngram", metric="adversary_q")[0]["value"] == 60
    # two folds would leave 45 prompts to train on where the sample bound is 60
    assert "eval.crossfit = 2" in _error(_invoke("--teacher", t, "--student", s,
                                                 "--adversaries", "ngram", "--crossfit", "2"))
    assert "--crossfit" in _error(_invoke("--teacher", t, "--student", s, "--crossfit", "0"))
