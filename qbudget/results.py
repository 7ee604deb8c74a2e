"""The results store: ``results.parquet``, long/tidy, one row per measured value.

Every checkpoint of every run appends rows here, and everything downstream (summaries,
paired comparisons, plots, other people's pandas/polars/duckdb notebooks) reads only this
file, so its schema is fixed and explicit (see :data:`SCHEMA`) rather than inferred from
whatever Python objects a caller happened to pass.

Why whole-file rewrites: Parquet has no append. A run writes a few hundred rows per
checkpoint, so re-reading and rewriting the file is cheap, and doing it through a temporary
file plus :func:`os.replace` means a crash (or a validation error) never leaves a
half-written ``results.parquet`` behind: readers see either the old file or the new one.
"""

from __future__ import annotations

import math
import numbers
import os
import uuid
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from qbudget.errors import QBudgetError

RESULTS_FILE = "results.parquet"
CELLS_DIR = "cells"

#: The explicit Arrow schema, in the column order of every results file (docs/design.md), then
#: the integer extras. ``ci_low``/``ci_high`` may be null (a metric without an
#: interval); ``n`` (sample count behind the value), ``paid`` (real oracle calls so far,
#: training account) and ``eval_paid`` (real oracle calls so far on the evaluation account:
#: probe and ceiling answers), ``tokens`` and ``usd`` (tokens and US dollars of the training
#: queries consumed up to this q: what ``[budget] tokens`` / ``usd`` cap) and ``eval_usd``
#: (dollars of the evaluation answers used so far) may be null when the producer does not
#: know them; files written before a column existed read back with it null.
SCHEMA = pa.schema([
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("world", pa.string(), nullable=False),
    pa.field("strategy", pa.string(), nullable=False),
    pa.field("seed", pa.int64(), nullable=False),
    pa.field("q", pa.int64(), nullable=False),
    pa.field("metric", pa.string(), nullable=False),
    pa.field("adversary", pa.string(), nullable=False),
    pa.field("category", pa.string(), nullable=False),
    pa.field("value", pa.float64(), nullable=False),
    pa.field("ci_low", pa.float64(), nullable=True),
    pa.field("ci_high", pa.float64(), nullable=True),
    pa.field("n", pa.int64(), nullable=True),
    pa.field("paid", pa.int64(), nullable=True),
    pa.field("eval_paid", pa.int64(), nullable=True),
    pa.field("tokens", pa.int64(), nullable=True),
    pa.field("usd", pa.float64(), nullable=True),
    pa.field("eval_usd", pa.float64(), nullable=True),
])
#: Column order of every results file.
RESULT_COLUMNS: tuple[str, ...] = tuple(SCHEMA.names)

_STRING = ("run_id", "world", "strategy", "metric", "adversary", "category")
_INT_REQUIRED = ("seed", "q")
_INT_OPTIONAL = ("n", "paid", "eval_paid", "tokens")
_FLOAT_OPTIONAL = ("ci_low", "ci_high", "usd", "eval_usd")
#: columns added after the first results files were written: absent ones read back null
_LATER = ("n", "paid", "eval_paid", "tokens", "usd", "eval_usd")
#: Fields a row must carry; ``adversary`` may be "" (non-adversary metrics) but not absent.
REQUIRED_FIELDS: tuple[str, ...] = _STRING + _INT_REQUIRED + ("value",)

#: A value is identified by these columns; merging keeps the last row for each key.
ROW_KEY: tuple[str, ...] = ("run_id", "world", "strategy", "seed", "q", "metric",
                            "adversary", "category")


def _missing(v) -> bool:
    if v is None or v is pd.NA:
        return True
    return isinstance(v, float) and math.isnan(v)


def _as_int(v, field: str, where: str, optional: bool):
    if _missing(v):
        if optional:
            return None
        raise QBudgetError(f"results row {where}: field '{field}' is missing")
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        raise QBudgetError(f"results row {where}: field '{field}' must be an integer, got {v!r}")
    if isinstance(v, numbers.Integral):
        return int(v)
    if float(v).is_integer():  # pandas turns nullable ints into floats in to_dict()
        return int(v)
    raise QBudgetError(f"results row {where}: field '{field}' must be an integer, got {v!r}")


def _as_float(v, field: str, where: str, optional: bool):
    if v is None or v is pd.NA:
        if optional:
            return None
        raise QBudgetError(f"results row {where}: field '{field}' is missing")
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        raise QBudgetError(f"results row {where}: field '{field}' must be a number, got {v!r}")
    f = float(v)
    return None if (optional and math.isnan(f)) else f


def _columns(rows: Sequence[Mapping]) -> dict[str, list]:
    """Validate rows and turn them into typed columns (unknown keys are ignored)."""
    cols: dict[str, list] = {c: [] for c in RESULT_COLUMNS}
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise QBudgetError(f"results row {i} is a {type(row).__name__}, not a mapping")
        absent = [f for f in REQUIRED_FIELDS if f not in row]
        if absent:
            raise QBudgetError(f"results row {i} lacks field(s): {', '.join(absent)}")
        where = f"{i}"
        for f in _STRING:
            v = row[f]
            if not isinstance(v, str):
                raise QBudgetError(f"results row {where}: field '{f}' must be a string, got {v!r}")
            cols[f].append(v)
        for f in _INT_REQUIRED:
            cols[f].append(_as_int(row[f], f, where, optional=False))
        if cols["q"][-1] < 0:
            raise QBudgetError(f"results row {where}: q must be >= 0, got {cols['q'][-1]}")
        cols["value"].append(_as_float(row["value"], "value", where, optional=False))
        for f in _FLOAT_OPTIONAL:
            cols[f].append(_as_float(row.get(f), f, where, optional=True))
        for f in _INT_OPTIONAL:
            cols[f].append(_as_int(row.get(f), f, where, optional=True))
    return cols


def rows_to_table(rows: Sequence[Mapping] | pd.DataFrame) -> pa.Table:
    """Validated rows (dicts, or a DataFrame with the result columns) as an Arrow table."""
    if isinstance(rows, pd.DataFrame):
        rows = rows.to_dict("records")
    cols = _columns(list(rows))
    return pa.Table.from_pydict(cols, schema=SCHEMA)


def _write_table_atomic(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # a unique sibling (same filesystem, so the rename is atomic), created by the writer
    # with the user's umask (mkstemp would make it 0600)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        pq.write_table(table, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _read_table(path: Path) -> pa.Table:
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise QBudgetError(f"{path} is not a readable results file ({exc})") from None
    absent = [c for c in RESULT_COLUMNS if c not in table.column_names and c not in _LATER]
    if absent:
        raise QBudgetError(f"{path} is not a results file: it lacks column(s) {', '.join(absent)}")
    for c in _LATER:
        if c not in table.column_names:
            table = table.append_column(c, pa.nulls(table.num_rows, SCHEMA.field(c).type))
    try:
        return table.select(list(RESULT_COLUMNS)).cast(SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise QBudgetError(f"{path} has results columns of the wrong type ({exc})") from None


def write_results(path: str | os.PathLike, rows: Sequence[Mapping] | pd.DataFrame) -> None:
    """Replace ``path`` with exactly ``rows`` (validated first; written atomically)."""
    _write_table_atomic(Path(path), rows_to_table(rows))


def append_results(path: str | os.PathLike, rows: Sequence[Mapping] | pd.DataFrame) -> None:
    """Add ``rows`` to ``path`` (created if absent). Re-reads and rewrites the whole file
    atomically, so an interrupted append leaves the previous file intact."""
    path = Path(path)
    new = rows_to_table(rows)  # validate before touching anything
    if path.is_file():
        new = pa.concat_tables([_read_table(path), new])
    _write_table_atomic(path, new)


def _to_frame(table: pa.Table) -> pd.DataFrame:
    df = table.to_pandas()
    for c in _INT_OPTIONAL:
        df[c] = df[c].astype("Int64")
    for c in _INT_REQUIRED:
        df[c] = df[c].astype("int64")
    return df


def empty_results() -> pd.DataFrame:
    """A results DataFrame with no rows and the proper dtypes."""
    return _to_frame(SCHEMA.empty_table())


def result_files(path_or_dir: str | os.PathLike) -> list[Path]:
    """The results files behind a path: the file itself, ``DIR/results.parquet``, or every
    ``DIR/cells/*/results.parquet`` of a sweep whose merged file is not written yet."""
    p = Path(path_or_dir)
    if p.is_file():
        return [p]
    if p.is_dir():
        if (p / RESULTS_FILE).is_file():
            return [p / RESULTS_FILE]
        cells = sorted((p / CELLS_DIR).glob(f"*/{RESULTS_FILE}"))
        if cells:
            return cells
        raise QBudgetError(f"no results in {p} (neither {RESULTS_FILE} nor {CELLS_DIR}/*/{RESULTS_FILE})")
    raise QBudgetError(f"results path {p} does not exist")


def read_results(path_or_dir: str | os.PathLike) -> pd.DataFrame:
    """All result rows under ``path_or_dir`` as a DataFrame with the schema's columns
    (``seed``/``q`` int64, ``n``/``paid`` nullable Int64, intervals NaN when absent)."""
    tables = [_read_table(f) for f in result_files(path_or_dir)]
    return _to_frame(pa.concat_tables(tables) if len(tables) > 1 else tables[0])


def merge_results(paths: Iterable[str | os.PathLike], out: str | os.PathLike) -> pd.DataFrame:
    """Merge several results files/dirs into ``out``. A value measured twice (same run,
    q, metric, adversary and category — e.g. a cell listed twice) keeps its last copy."""
    paths = list(paths)
    if not paths:
        raise QBudgetError("merge_results needs at least one results path")
    table = pa.concat_tables([_read_table(f) for p in paths for f in result_files(p)])
    df = _to_frame(table)
    df = df.drop_duplicates(subset=list(ROW_KEY), keep="last").reset_index(drop=True)
    write_results(out, df)
    return df
