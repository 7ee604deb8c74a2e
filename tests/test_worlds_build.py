"""Building, caching and loading the embedded worlds (micro), and the ``world`` commands."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from qbudget.cli import app
from qbudget.errors import QBudgetError
from qbudget.worlds import build_world, get_world, list_worlds
from qbudget.worlds import cache
from qbudget.worlds.specs import CATEGORIES, SPEC_VERSION

runner = CliRunner()
pytestmark = pytest.mark.slow          # builds micro (about 15-30 s per cold build)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A private $QBUDGET_HOME holding one micro world built through get_world."""
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("qbhome")
    mp.setenv("QBUDGET_HOME", str(root))
    yield root
    mp.undo()


@pytest.fixture(scope="module")
def micro(home):
    return get_world("micro")


@pytest.fixture(scope="module")
def micro_out(home, tmp_path_factory):
    """A second, independent build of micro, made by the CLI into --out DIR."""
    out = tmp_path_factory.mktemp("out") / "micro-copy"
    result = runner.invoke(app, ["world", "build", "micro", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert re.search(rf"^world 'micro' ready at {re.escape(str(out.resolve()))} "
                     r"\(1,000 pool, 250 probe prompts; [0-9.]+ s\)$", result.stdout, re.M), result.stdout
    assert cache.problem(out, "micro", SPEC_VERSION) is None
    return out


def test_world_api_shape(micro, home):
    assert micro.name == "micro"
    assert micro.root == home / "worlds" / "micro"
    assert micro.categories == list(CATEGORIES)
    assert len(micro.pool) == 1_000 and len(micro.probe) == 250
    assert micro.probe_is_train.dtype == bool and micro.probe_is_train.sum() == 200
    assert {p.category for p in micro.pool} == set(CATEGORIES)
    assert not {p.text for p in micro.pool} & {p.text for p in micro.probe}
    assert not {p.id for p in micro.pool} & {p.id for p in micro.probe}
    assert micro.sampling["temperature"] > 0 and 0 < micro.sampling["top_p"] <= 1
    assert micro.sampling["max_new_tokens"] > 0
    for d in (micro.teacher_dir, micro.student_dir):
        for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert (d / f).is_file(), d / f
    info = json.loads((micro.root / "world.json").read_text())
    assert info["version"] == SPEC_VERSION and info["seed"] == micro.seed
    assert info["sizes"]["pool"] == 1_000 and set(info["files"]) >= {"pool.jsonl", "probe.jsonl"}


def test_build_is_byte_identical_across_builds(micro, micro_out):
    a = cache.checksums(micro.root)
    b = cache.checksums(micro_out)
    assert a == b and "teacher/model.safetensors" in a
    assert (micro.root / "world.json").read_bytes() == (micro_out / "world.json").read_bytes()


def test_get_world_reuses_a_valid_cache(micro):
    stamp = (micro.root / "world.json").stat().st_mtime_ns
    again = get_world("micro")
    assert (again.root / "world.json").stat().st_mtime_ns == stamp
    assert [p.id for p in again.probe] == [p.id for p in micro.probe]


def test_get_world_accepts_a_built_folder(micro_out):
    w = get_world(str(micro_out))
    assert w.name == "micro" and w.root == micro_out.resolve()


def test_checkpoints_load_and_match_transformers(micro):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qbudget.models import CausalLM

    tok = AutoTokenizer.from_pretrained(micro.teacher_dir)
    ids = tok([p.text for p in micro.probe[:4]], padding=True)["input_ids"]
    ids = np.asarray(ids, dtype=np.int32)
    for d, arch in ((micro.teacher_dir, "Qwen2ForCausalLM"), (micro.student_dir, "LlamaForCausalLM")):
        ours = np.asarray(CausalLM.from_pretrained(d)(ids))
        ref = AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32)
        assert type(ref).__name__ == arch
        with torch.no_grad():
            theirs = ref(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
        assert ours.shape == theirs.shape
        assert np.max(np.abs(ours - theirs)) <= 1e-4


def test_corruption_is_detected_and_rebuilt(micro, tmp_path, monkeypatch):
    # A private copy of the cache, so the shared fixture world stays intact.
    monkeypatch.setenv("QBUDGET_HOME", str(tmp_path))
    root = tmp_path / "worlds" / "micro"
    shutil.copytree(micro.root, root)
    assert cache.problem(root, "micro", SPEC_VERSION) is None

    weights = root / "student" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    assert "checksum mismatch" in cache.problem(root, "micro", SPEC_VERSION)
    assert not [r for r in list_worlds() if r["name"] == "micro"][0]["built"]

    rebuilt = get_world("micro")
    assert cache.problem(rebuilt.root, "micro", SPEC_VERSION) is None
    assert cache.checksums(rebuilt.root) == cache.checksums(micro.root)
    assert not list(tmp_path.glob("worlds/.micro.*-*"))          # no temp dirs left behind

    spec = json.loads((root / "world.json").read_text())["spec"]
    spec["teacher"]["steps"] += 1                                # an older world definition
    assert "different world definition" in cache.problem(root, "micro", SPEC_VERSION, spec)

    (root / "probe.jsonl").unlink()
    assert cache.problem(root, "micro", SPEC_VERSION) == "missing file probe.jsonl"
    (root / "world.json").unlink()
    assert "world.json" in cache.problem(root, "micro", SPEC_VERSION)


def test_failed_build_leaves_no_partial_world(tmp_path, monkeypatch):
    monkeypatch.setenv("QBUDGET_HOME", str(tmp_path))
    root = cache.default_root("micro")

    def boom(tmp):
        (tmp / "pool.jsonl").write_text("half")
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError):
        cache.atomic_build(root, boom)
    assert not root.exists()
    assert not [p for p in root.parent.iterdir() if p.is_dir()]


def _table_rows(output: str) -> dict[str, list[str]]:
    """The body rows of the `world list` table: {name: [name, architecture, ..., where]}."""
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.split("\u2502")]       # rich's vertical bar
        if len(cells) == 10 and cells[1]:                       # border | 8 columns | border
            rows[cells[1]] = cells[1:-1]
    return rows


def test_world_list_command(micro, home):
    result = runner.invoke(app, ["world", "list"])
    assert result.exit_code == 0, result.output
    table = _table_rows(result.output)
    assert set(table) >= {"micro", "tiny-qwen2", "tiny-llama"}, result.output
    # columns: name, architecture, pool, probe, teacher params, student params, status, where
    assert table["micro"][6] == "built", table["micro"]
    assert table["micro"][7] == str(micro.root) == str(home / "worlds" / "micro")
    assert table["micro"][2:4] == ["1,000", "250"] and table["micro"][1] == "qwen2/llama"
    # the tiny worlds are not built in this private home: their status says so
    assert table["tiny-qwen2"][6] == "not built" and table["tiny-llama"][6] == "not built"
    assert table["tiny-qwen2"][1] == "qwen2" and table["tiny-llama"][1] == "llama"
    for f in ("world.json", "pool.jsonl", "probe.jsonl", "teacher/model.safetensors",
              "student/model.safetensors"):
        assert (micro.root / f).is_file(), f
    rows = {r["name"]: r for r in list_worlds()}
    assert rows["micro"]["built"] is True and rows["micro"]["status"] == "built"
    assert rows["tiny-qwen2"]["built"] is False and rows["tiny-qwen2"]["status"] == "not built"
    assert rows["tiny-qwen2"]["pool"] == 20_000
    assert rows["tiny-qwen2"]["student_params"] < rows["tiny-qwen2"]["teacher_params"]


def test_unknown_world_exits_two(home):
    result = runner.invoke(app, ["world", "build", "nope"])
    assert result.exit_code == 2
    assert "unknown world 'nope'" in result.output
    with pytest.raises(QBudgetError, match="unknown world"):
        get_world("nope")


def test_out_dir_that_is_not_a_world_is_refused(home, tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    result = runner.invoke(app, ["world", "build", "micro", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "not a qbudget world" in result.output
    assert (tmp_path / "precious.txt").read_text() == "keep me"
