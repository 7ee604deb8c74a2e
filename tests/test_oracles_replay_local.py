"""ReplayOracle (JSONL / Parquet recordings) and LocalModelOracle (a tiny real checkpoint)."""

from __future__ import annotations

import json

import pytest

from qbudget.errors import QBudgetError
from qbudget.ledger import Ledger
from qbudget.oracles import LocalModelOracle, ReplayOracle, load_replay, write_replay
from qbudget.pool import Prompt

ROWS = [{"id": f"p{i}", "prompt": f"question {i}", "response": f"answer {i}", "category": "c"}
        for i in range(4)] + [{"id": "p0", "prompt": "question 0", "response": "again", "sample": 1}]


@pytest.fixture(params=[".jsonl", ".parquet"])
def recording(request, tmp_path):
    path = tmp_path / f"rec{request.param}"
    write_replay(path, ROWS)
    return path


def test_replay_serves_recorded_answers_by_id_or_text(recording):
    oracle = ReplayOracle(recording)
    asked = [Prompt("p2", "question 2", "c"), Prompt("other-id", "question 1", "c")]
    assert oracle.answer(asked) == ["answer 2", "answer 1"]
    assert oracle.answer([Prompt("p0", "question 0", "c")], sample=1) == ["again"]
    assert len(oracle) == 5


def test_replay_fingerprint_depends_on_content_not_format(tmp_path):
    write_replay(tmp_path / "a.jsonl", ROWS)
    write_replay(tmp_path / "b.parquet", ROWS)
    write_replay(tmp_path / "c.jsonl", ROWS[:-1])
    a, b, c = (ReplayOracle(tmp_path / n) for n in ("a.jsonl", "b.parquet", "c.jsonl"))
    assert a.fingerprint == b.fingerprint != c.fingerprint


def test_unrecorded_prompt_is_a_clear_error_and_costs_nothing(recording, tmp_path):
    oracle = ReplayOracle(recording)
    with pytest.raises(QBudgetError, match=r"prompt 'p9' is not recorded in .*rec"):
        oracle.answer([Prompt("p1", "question 1", "c"), Prompt("p9", "never asked", "c")])
    with pytest.raises(QBudgetError, match="'p3' sample 1 is not recorded"):
        oracle.answer([Prompt("p3", "question 3", "c")], sample=1)
    with pytest.raises(QBudgetError, match="'p1' has different text"):
        oracle.answer([Prompt("p1", "an edited question", "c")])
    ledger = Ledger(tmp_path / "l.sqlite", budget=3)
    with pytest.raises(QBudgetError, match="'p9'"):
        ledger.buy(oracle, [Prompt("p1", "question 1", "c"), Prompt("p9", "never", "c")])
    assert (ledger.q, ledger.paid, ledger.remaining) == (0, 0, 3)


@pytest.mark.parametrize("lines,match", [
    (['{"id": "a", "prompt": "x", "response": "y"}', '{"id": "b", "prompt": "x"'],
     r":2: malformed JSON"),
    (['{"id": "a", "prompt": "x"}'], r":1: missing field 'response'"),
    (['', '{"id": "a", "prompt": 3, "response": "y"}'], r":2: field 'prompt' must be a string"),
    (['["a", "x", "y"]'], r":1: expected a JSON object"),
    (['{"id": "a", "prompt": "x", "response": "y", "sample": -1}'], r"'sample' must be"),
    (['{"id": "a", "prompt": "x", "response": "y"}'] * 2,
     r":2: duplicate answer for prompt 'a' sample 0 \(first at .*:1\)"),
    ([], r"no recorded answers"),
])
def test_malformed_jsonl_names_the_line(tmp_path, lines, match):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(QBudgetError, match=match) as info:
        ReplayOracle(path)
    assert "\n" not in str(info.value)


def test_malformed_parquet_and_paths(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["a"], "prompt": ["x"]}), tmp_path / "nocol.parquet")
    with pytest.raises(QBudgetError, match="missing column 'response'"):
        load_replay(tmp_path / "nocol.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(QBudgetError, match="not a readable Parquet file") as info:
        load_replay(tmp_path / "junk.parquet")
    assert "\n" not in str(info.value)
    pq.write_table(pa.table({"id": ["a", None], "prompt": ["x", "y"], "response": ["1", "2"]}),
                   tmp_path / "null.parquet")
    with pytest.raises(QBudgetError, match="row 2: missing field 'id'"):
        load_replay(tmp_path / "null.parquet")
    with pytest.raises(QBudgetError, match="not found"):
        ReplayOracle(tmp_path / "absent.jsonl")
    (tmp_path / "rec.csv").write_text("id,prompt,response\n")
    with pytest.raises(QBudgetError, match=r"\.jsonl or \.parquet"):
        ReplayOracle(tmp_path / "rec.csv")


def test_write_replay_is_atomic_and_leaves_no_temp_files(tmp_path):
    write_replay(tmp_path / "r.jsonl", ROWS)
    assert [p.name for p in tmp_path.iterdir()] == ["r.jsonl"]
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert rows[0] == {"id": "p0", "prompt": "question 0", "response": "answer 0", "category": "c"}


# ---------------------------------------------------------------- recorded usage
#: the fingerprint ROWS had before usage columns existed: existing caches must keep hitting
ROWS_FINGERPRINT = "18fae4628158791b04d937c31ae028b5bee75311f0cbc3b51805726d43007f88"

USAGE_ROWS = [
    {"id": "p0", "prompt": "question 0", "response": "answer 0", "prompt_tokens": 12,
     "completion_tokens": 30},                                              # recorded
    {"id": "p1", "prompt": "question 1", "response": "answer 1", "prompt_tokens": 9,
     "completion_tokens": 4, "usage_source": "server", "usd": 0.0125},      # priced batch
    {"id": "p2", "prompt": "question two, longer", "response": "a reply of 17 bytes"},
    {"id": "p3", "prompt": "question 3", "response": "answer 3", "usd": 2},  # cost, no counts
    {"id": "p0", "prompt": "question 0", "response": "again", "sample": 1, "prompt_tokens": 12,
     "completion_tokens": 50, "usage_source": "server"},
]


def test_fingerprint_without_usage_columns_is_unchanged(tmp_path):
    for name in ("a.jsonl", "b.parquet"):
        write_replay(tmp_path / name, ROWS)
        assert ReplayOracle(tmp_path / name).fingerprint == ROWS_FINGERPRINT
    # null usage columns (a Parquet union of rows with and without them) are absent
    write_replay(tmp_path / "c.parquet", ROWS + [{"id": "x", "prompt": "q", "response": "r",
                                                  "prompt_tokens": None, "usd": None}])
    write_replay(tmp_path / "d.jsonl", ROWS + [{"id": "x", "prompt": "q", "response": "r"}])
    assert ReplayOracle(tmp_path / "c.parquet").fingerprint == \
        ReplayOracle(tmp_path / "d.jsonl").fingerprint
    # recorded costs are part of what the oracle reports: they change the fingerprint
    write_replay(tmp_path / "e.jsonl", USAGE_ROWS)
    write_replay(tmp_path / "f.parquet", USAGE_ROWS)
    write_replay(tmp_path / "g.jsonl", [{**r, "usd": 0.5} if r["id"] == "p1" else r
                                        for r in USAGE_ROWS])
    e, f, g = (ReplayOracle(tmp_path / n).fingerprint for n in ("e.jsonl", "f.parquet", "g.jsonl"))
    assert e == f != g
    plain = [{k: v for k, v in r.items() if k in ("id", "prompt", "response", "sample")}
             for r in USAGE_ROWS]
    write_replay(tmp_path / "h.jsonl", plain)
    assert ReplayOracle(tmp_path / "h.jsonl").fingerprint != e


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_answer_usage_serves_recorded_usage_or_a_marked_estimate(tmp_path, suffix):
    from qbudget.oracles.usage import Price, Usage, answer_with_usage

    write_replay(tmp_path / f"u{suffix}", USAGE_ROWS)
    oracle = ReplayOracle(tmp_path / f"u{suffix}")
    asked = [Prompt("p0", "question 0", "c"), Prompt("p1", "question 1", "c"),
             Prompt("p2", "question two, longer", "c"), Prompt("p3", "question 3", "c"),
             Prompt("renamed", "question 1", "c")]                     # found by its text
    got = oracle.answer_usage(asked)
    assert got == answer_with_usage(oracle, asked)
    assert [text for text, _ in got] == oracle.answer(asked)
    assert [u for _, u in got] == [
        Usage(12, 30, "recorded"), Usage(9, 4, "server", 0.0125),
        Usage(5, 5, "estimate"),            # ceil(20 / 4) prompt bytes, ceil(19 / 4) answer
        Usage(3, 2, "estimate", 2.0), Usage(9, 4, "server", 0.0125)]
    assert oracle.answer_usage([asked[0]], sample=1) == [("again", Usage(12, 50, "server"))]
    price = Price(1.0, 2.0)
    assert price.cost(got[1][1]) == 0.0125 and price.cost(got[0][1]) == pytest.approx(72e-6)

    # worst case: the recorded usage (the most any recorded sample of the prompt used)
    assert oracle.worst_case(asked[0]) == Usage(12, 50, "recorded")
    assert oracle.worst_case(asked[1]) == Usage(9, 4, "server", 0.0125)
    assert oracle.worst_case(asked[4]) == Usage(9, 4, "server", 0.0125)
    assert oracle.worst_case(asked[2]) == Usage(5, 5, "estimate")
    # unrecorded: its bytes plus the template margin, and the longest recorded answer
    assert oracle.worst_case(Prompt("p9", "never asked", "c")) == Usage(11 + 64, 50, "estimate")
    assert oracle.worst_case(Prompt("p1", "edited text", "c")).completion_tokens == 50
    with pytest.raises(QBudgetError, match="'p1' has different text"):
        oracle.answer_usage([Prompt("p1", "edited text", "c")])


@pytest.mark.parametrize("extra,match", [
    ({"prompt_tokens": -1, "completion_tokens": 2}, r"field 'prompt_tokens' must be an integer >= 0, got -1"),
    ({"prompt_tokens": 1, "completion_tokens": 2.5}, r"field 'completion_tokens' must be an integer >= 0"),
    ({"prompt_tokens": "3", "completion_tokens": 2}, r"field 'prompt_tokens' must be an integer"),
    ({"prompt_tokens": True, "completion_tokens": 2}, r"field 'prompt_tokens' must be an integer"),
    ({"prompt_tokens": 3}, r"field 'completion_tokens' is missing"),
    ({"completion_tokens": 3}, r"field 'prompt_tokens' is missing"),
    ({"prompt_tokens": 1, "completion_tokens": 2, "usage_source": "bill"},
     r"field 'usage_source' must be one of server, tokenizer, recorded, estimate, got 'bill'"),
    ({"usage_source": "server"}, r"field 'usage_source' needs prompt_tokens and completion_tokens"),
    ({"usd": -0.5}, r"field 'usd' must be a number >= 0, got -0.5"),
    ({"usd": "1.0"}, r"field 'usd' must be a number >= 0"),
    ({"usd": float("nan")}, r"field 'usd' must be a number >= 0, got nan"),
    ({"usd": float("inf")}, r"field 'usd' must be a number >= 0"),
])
def test_bad_usage_fields_name_the_line_and_field(tmp_path, extra, match):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"id": "a", "prompt": "x", "response": "y", "prompt_tokens": 1,
                       "completion_tokens": 1})
    path.write_text(good + "\n" + json.dumps({"id": "b", "prompt": "x2", "response": "y2",
                                              **extra}) + "\n")
    with pytest.raises(QBudgetError, match=r"bad\.jsonl:2: " + match) as info:
        ReplayOracle(path)
    assert "\n" not in str(info.value)


def test_bad_usage_in_parquet_names_the_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["x", "y"], "response": ["1", "2"],
                             "prompt_tokens": [3, -4], "completion_tokens": [1, 1]}),
                   tmp_path / "neg.parquet")
    with pytest.raises(QBudgetError, match=r"neg\.parquet: row 2: field 'prompt_tokens'"):
        ReplayOracle(tmp_path / "neg.parquet")


# ---------------------------------------------------------------- local model oracle
@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny random Llama checkpoint in Hugging Face format (config.json + safetensors).

    Weights are written directly with numpy (instant) instead of initialising a model.
    """
    pytest.importorskip("qbudget.models.generate")
    import numpy as np
    import transformers
    from safetensors.numpy import save_file

    from qbudget.worlds.tokenizer import save_tokenizer, train_tokenizer

    folder = tmp_path_factory.mktemp("teacher")
    texts = [f"what is {a} plus {b}? it is {a + b}." for a in range(20) for b in range(5)]
    tok = train_tokenizer(texts, vocab_size=128)
    save_tokenizer(tok, folder, model_max_length=128)
    vocab, hidden, inter, heads, kv, hd = tok.get_vocab_size(), 32, 64, 2, 1, 16
    transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=1,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=1, eos_token_id=2).save_pretrained(folder)
    rng = np.random.default_rng(0)
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden),
              "model.layers.0.self_attn.q_proj.weight": (heads * hd, hidden),
              "model.layers.0.self_attn.k_proj.weight": (kv * hd, hidden),
              "model.layers.0.self_attn.v_proj.weight": (kv * hd, hidden),
              "model.layers.0.self_attn.o_proj.weight": (hidden, heads * hd),
              "model.layers.0.mlp.gate_proj.weight": (inter, hidden),
              "model.layers.0.mlp.up_proj.weight": (inter, hidden),
              "model.layers.0.mlp.down_proj.weight": (hidden, inter)}
    weights = {k: rng.normal(0, 0.5, v).astype(np.float32) for k, v in shapes.items()}
    for k in ("model.layers.0.input_layernorm.weight",
              "model.layers.0.post_attention_layernorm.weight", "model.norm.weight"):
        weights[k] = np.ones(hidden, np.float32)
    save_file(weights, str(folder / "model.safetensors"))
    return folder


SAMPLING = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 6}
QUESTIONS = [Prompt(f"q{i}", f"what is {i} plus {i}?", "c") for i in range(6)]


def test_local_answers_do_not_depend_on_the_batch(teacher_dir):
    # batch_size=2 everywhere keeps this to one compiled shape; batches still differ
    oracle = LocalModelOracle(teacher_dir, SAMPLING, seed=3, batch_size=2)
    full = oracle.answer(QUESTIONS)
    assert len(full) == 6 and all(isinstance(a, str) for a in full)
    assert len(set(full)) > 1
    assert oracle.answer(QUESTIONS[::-1])[::-1] == full          # other batch-mates
    assert oracle.answer([QUESTIONS[4], QUESTIONS[0]]) == [full[4], full[0]]
    # the seed is per (prompt text, sample): another sample or seed is another draw
    assert oracle.answer(QUESTIONS, sample=1) != full
    assert LocalModelOracle(teacher_dir, SAMPLING, seed=4, batch_size=2).answer(QUESTIONS) != full


def test_local_fingerprint_covers_weights_sampling_and_seed(teacher_dir, tmp_path):
    import shutil

    a = LocalModelOracle(teacher_dir, SAMPLING, seed=3)
    assert a.fingerprint == LocalModelOracle(teacher_dir, dict(SAMPLING), seed=3,
                                             batch_size=8).fingerprint
    assert a.fingerprint != LocalModelOracle(teacher_dir, {**SAMPLING, "top_p": 0.9}, 3).fingerprint
    assert a.fingerprint != LocalModelOracle(teacher_dir, SAMPLING, seed=4).fingerprint
    copy = tmp_path / "copy"
    shutil.copytree(teacher_dir, copy)
    assert LocalModelOracle(copy, SAMPLING, seed=3).fingerprint == a.fingerprint
    weights = next(copy.glob("*.safetensors"))
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 1
    weights.write_bytes(bytes(blob))
    assert LocalModelOracle(copy, SAMPLING, seed=3).fingerprint != a.fingerprint


def test_local_oracle_input_errors(tmp_path):
    with pytest.raises(QBudgetError, match="not found"):
        LocalModelOracle(tmp_path / "absent", SAMPLING, seed=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(QBudgetError, match="no config.json"):
        LocalModelOracle(tmp_path / "empty", SAMPLING, seed=0)
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(QBudgetError, match="unknown sampling setting 'temprature'"):
        LocalModelOracle(tmp_path / "empty", {"temprature": 1.0}, seed=0)
    with pytest.raises(QBudgetError, match="top_p"):
        LocalModelOracle(tmp_path / "empty", {"top_p": 0.0}, seed=0)
    # construction is cheap and lazy: nothing is loaded until the first answer
    oracle = LocalModelOracle(tmp_path / "empty", SAMPLING, seed=0)
    assert oracle.answer([]) == []
