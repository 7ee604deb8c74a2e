"""A run directory's files: what a run leaves behind and what ``--resume`` reads back.

Layout of ``DIR``::

    manifest.json      config, versions, git revision, status, q/paid, timings
    ledger.sqlite      the run's purchases (the budget's durable record)
    responses.sqlite   the response cache (unless a shared one is given)
    state.pkl          everything needed to continue after the last completed round
    results.parquet    result rows of every checkpoint evaluated so far
    adapter/           the distilled student's LoRA, in PEFT's format (when done)

Every file is replaced atomically (temp file + fsync + rename), so a killed run leaves
the previous version or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

from qbudget.errors import QBudgetError
from qbudget.manifest import base_manifest, write_json_atomic

STATE_FILE = "state.pkl"
MANIFEST_FILE = "manifest.json"
RESULTS_FILE = "results.parquet"
LEDGER_FILE = "ledger.sqlite"
CACHE_FILE = "responses.sqlite"
ADAPTER_DIR = "adapter"


def config_json(obj) -> str:
    """Canonical JSON of a config dict (sorted keys; tuples as lists): what is compared."""
    return json.dumps(obj, sort_keys=True, default=list)


def config_roundtrip(obj):
    """A config dict as it reads back from the manifest (tuples become lists)."""
    return json.loads(config_json(obj))


def pickle_atomic(path: Path, obj) -> None:
    """Pickle ``obj`` to ``path`` atomically (temp file per process + fsync + rename),
    so a reader sees the old file or the new one, even with two writers at once."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as fh:
        pickle.dump(obj, fh, protocol=pickle.HIGHEST_PROTOCOL)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


class RunDir:
    """The files of one run directory (see the module docstring)."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.state = self.out / STATE_FILE
        self.manifest = self.out / MANIFEST_FILE
        self.results = self.out / RESULTS_FILE
        self.ledger = self.out / LEDGER_FILE
        self.cache = self.out / CACHE_FILE
        self.adapter = self.out / ADAPTER_DIR

    def check(self, resume: bool, config: dict) -> None:
        """Refuse to mix runs: a non-empty DIR needs --resume, --resume needs the same run."""
        if resume:
            if not self.manifest.is_file():
                raise QBudgetError(f"--resume: no run to resume in {self.out} (manifest.json missing)")
            if json.loads(self.manifest.read_text()).get("config") != config_roundtrip(config):
                raise QBudgetError(f"--resume: the config differs from the run in {self.out}")
        elif self.out.exists() and any(self.out.iterdir()):
            raise QBudgetError(f"output directory {self.out} is not empty "
                               "(use --resume to continue a run)")

    def load_state(self, resume: bool):
        """The saved run state when resuming one that completed a round, else None."""
        if resume and self.state.is_file():
            with self.state.open("rb") as fh:
                return pickle.load(fh)
        return None

    def save_state(self, state) -> None:
        pickle_atomic(self.state, state)

    def keep_results(self, evaluated: list[int]) -> None:
        """On resume: drop rows evaluated after the last saved state (they are recomputed)."""
        from qbudget.results import read_results, write_results

        if self.results.is_file():
            df = read_results(self.results)
            write_results(self.results, df[df["q"].isin(evaluated)].to_dict("records"))

    def append_results(self, rows: list[dict]) -> None:
        from qbudget.results import append_results

        append_results(self.results, rows)

    def result_count(self) -> int:
        from qbudget.results import read_results

        return len(read_results(self.results))

    def write_manifest(self, config: dict, seed: int, fields: dict) -> None:
        """(Re)write manifest.json; ``created`` survives rewrites and resumes."""
        manifest = base_manifest("run", config_roundtrip(config), seed)
        if self.manifest.is_file():
            manifest["created"] = json.loads(self.manifest.read_text()).get("created",
                                                                             manifest["created"])
        manifest.update(fields)
        write_json_atomic(self.manifest, manifest)
