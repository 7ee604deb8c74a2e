"""results.parquet: schema, append/read round trip, sweep merging, atomicity, bad rows."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import qbudget.results as results
from qbudget.errors import QBudgetError
from qbudget.results import (RESULT_COLUMNS, SCHEMA, append_results, merge_results, read_results,
                             write_results)


def rows(run_id="tiny__random__seed0", q=16, seed=0, strategy="random", n=3):
    out = []
    for i in range(n):
        out.append({"run_id": run_id, "world": "tiny", "strategy": strategy, "seed": seed, "q": q,
                    "metric": "advantage", "adversary": ["ngram", "embed", "max"][i % 3],
                    "category": "all", "value": 0.1 * (i + 1), "ci_low": 0.05 * i,
                    "ci_high": 0.2 + 0.1 * i, "n": 1000, "paid": q})
    out.append({"run_id": run_id, "world": "tiny", "strategy": strategy, "seed": seed, "q": q,
                "metric": "similarity", "adversary": "", "category": "math", "value": 0.8})
    return out


def test_schema_is_explicit_and_typed(tmp_path):
    path = tmp_path / "results.parquet"
    append_results(path, rows())
    schema = pq.read_schema(path)
    assert schema.names == list(RESULT_COLUMNS)
    assert schema.equals(SCHEMA)
    assert schema.field("seed").type == pa.int64() and schema.field("value").type == pa.float64()
    df = read_results(path)
    assert list(df.columns) == list(RESULT_COLUMNS)
    assert df["seed"].dtype == np.int64 and df["q"].dtype == np.int64
    assert str(df["n"].dtype) == "Int64" and str(df["paid"].dtype) == "Int64"
    assert df["value"].dtype == np.float64 and pd.api.types.is_string_dtype(df["metric"])
    # plain pandas/pyarrow read it too
    assert len(pd.read_parquet(path)) == 4


def test_append_read_round_trip(tmp_path):
    path = tmp_path / "run" / "results.parquet"
    first, second = rows(q=0), rows(q=16)
    append_results(path, first)
    append_results(path, second)
    df = read_results(path)
    assert len(df) == 8
    assert df["q"].tolist() == [0] * 4 + [16] * 4
    back = df.iloc[:4].to_dict("records")
    for got, want in zip(back, first):
        for key in ("run_id", "world", "strategy", "seed", "q", "metric", "adversary", "category",
                    "value"):
            assert got[key] == want[key]
        assert got["ci_low"] == pytest.approx(want.get("ci_low", math.nan), nan_ok=True)
    # missing optional fields are null, not zero
    sim = df[df.metric == "similarity"].iloc[0]
    assert pd.isna(sim["n"]) and pd.isna(sim["paid"]) and math.isnan(sim["ci_low"])
    # a DataFrame read back can be written back unchanged (what resume and bench do)
    write_results(tmp_path / "copy.parquet", df.to_dict("records"))
    pd.testing.assert_frame_equal(read_results(tmp_path / "copy.parquet"), df)
    write_results(tmp_path / "copy2.parquet", df)
    pd.testing.assert_frame_equal(read_results(tmp_path / "copy2.parquet"), df)


def test_read_a_run_dir_and_a_sweep_dir(tmp_path):
    sweep = tmp_path / "sweep"
    for s, sd in (("random", 0), ("random", 1), ("stratified", 0)):
        append_results(sweep / "cells" / f"tiny__{s}__seed{sd}" / "results.parquet",
                       rows(run_id=f"tiny__{s}__seed{sd}", strategy=s, seed=sd))
    df = read_results(sweep)  # no merged file yet: the cells are merged
    assert len(df) == 12 and set(df["run_id"]) == {"tiny__random__seed0", "tiny__random__seed1",
                                                   "tiny__stratified__seed0"}
    single = read_results(sweep / "cells" / "tiny__random__seed1")
    assert set(single["seed"]) == {1}
    merged = merge_results([sweep / "cells" / "tiny__random__seed0", sweep], sweep / "results.parquet")
    assert len(merged) == 12  # the cell listed twice is not duplicated
    assert len(read_results(sweep)) == 12  # now DIR/results.parquet is what is read


def test_write_replaces_and_empty_files_are_valid(tmp_path):
    path = tmp_path / "results.parquet"
    append_results(path, rows(n=3))
    write_results(path, rows(n=1))
    assert len(read_results(path)) == 2
    write_results(path, [])
    df = read_results(path)
    assert df.empty and list(df.columns) == list(RESULT_COLUMNS)


def test_atomic_append_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "results.parquet"
    append_results(path, rows(q=0))
    before = path.read_bytes()

    def broken_write(table, where, *a, **k):  # dies half-way through writing
        with open(where, "wb") as fh:
            fh.write(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(results.pq, "write_table", broken_write)
    with pytest.raises(OSError, match="disk full"):
        append_results(path, rows(q=16))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.parquet"]  # no temp left
    assert len(read_results(path)) == 4


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.pop("value"), "lacks field"),
    (lambda r: r.pop("adversary"), "lacks field"),
    (lambda r: r.update(q="16"), "'q' must be an integer"),
    (lambda r: r.update(q=16.5), "'q' must be an integer"),
    (lambda r: r.update(q=-1), "q must be >= 0"),
    (lambda r: r.update(seed=None), "'seed' is missing"),
    (lambda r: r.update(value="high"), "'value' must be a number"),
    (lambda r: r.update(strategy=3), "'strategy' must be a string"),
    (lambda r: r.update(n=True), "'n' must be an integer"),
])
def test_bad_rows_raise_before_anything_is_written(tmp_path, mutate, message):
    path = tmp_path / "results.parquet"
    append_results(path, rows(q=0))
    before = path.read_bytes()
    bad = rows(q=16)
    mutate(bad[1])
    with pytest.raises(QBudgetError, match=message):
        append_results(path, bad)
    assert path.read_bytes() == before


def test_unknown_keys_are_ignored_and_numpy_scalars_accepted(tmp_path):
    r = rows(n=1)[0]
    r.update(seed=np.int64(3), q=np.int32(64), value=np.float32(0.25), n=np.int64(10),
             flops=1.5e9)
    write_results(tmp_path / "r.parquet", [r])
    df = read_results(tmp_path / "r.parquet")
    assert (df.loc[0, "seed"], df.loc[0, "q"], df.loc[0, "n"]) == (3, 64, 10)
    assert "flops" not in df.columns


def test_missing_or_foreign_files_are_user_errors(tmp_path):
    with pytest.raises(QBudgetError, match="does not exist"):
        read_results(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(QBudgetError, match="no results in"):
        read_results(tmp_path / "empty")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(QBudgetError, match="not a readable results file"):
        read_results(tmp_path / "junk.parquet")
    pq.write_table(pa.table({"a": [1]}), tmp_path / "other.parquet")
    with pytest.raises(QBudgetError, match="lacks column"):
        read_results(tmp_path / "other.parquet")
    with pytest.raises(QBudgetError, match="at least one"):
        merge_results([], tmp_path / "m.parquet")
