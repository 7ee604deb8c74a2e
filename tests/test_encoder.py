"""SentenceEncoder: parity with transformers' BertModel (torch) + mean pooling, refusals."""

import json
import shutil

import numpy as np
import pytest

import transformers

from qbudget.errors import QBudgetError
from qbudget.models.encoder import SentenceEncoder

SENTENCES = [
    "Hi.",
    "A short sentence about the weather.",
    "Punctuation!!! (lots of it): commas, semicolons; dashes -- and \"quotes\"?",
    "Non-ASCII: café, naïve, Zürich, 東京, привет, emoji 🙂.",
    " ".join(f"word{i} and some more text to make this long" for i in range(40)),  # > 128 tokens
    "",
]


@pytest.fixture(scope="module")
def torch():
    """PyTorch, for the parity references only: without it those tests skip, the rest run."""
    return pytest.importorskip("torch")


def _reference(folder, texts, max_length=256):
    import torch

    model = transformers.BertModel.from_pretrained(str(folder)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    b = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.inference_mode():
        h = model(**b).last_hidden_state
    m = b["attention_mask"][..., None].float()
    e = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    return e.numpy(), b["input_ids"].shape[1]


@pytest.fixture(scope="module")
def minilm():
    return SentenceEncoder.from_pretrained()


def test_minilm_parity_with_transformers(minilm, torch):
    ours = minilm.encode(SENTENCES, batch_size=4)
    ref, width = _reference(minilm.path, SENTENCES)
    assert width > 128  # the long sentence really exceeds the tokenizer.json's 128 limit
    assert ours.shape == (len(SENTENCES), 384) and ours.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    assert ((ours * ref).sum(1) >= 0.9999).all(), (ours * ref).sum(1)


def test_order_and_batching_do_not_change_embeddings(minilm):
    batch = minilm.encode(SENTENCES, batch_size=64)
    rev = minilm.encode(SENTENCES[::-1], batch_size=2)[::-1]
    np.testing.assert_allclose(batch, rev, atol=2e-5)
    assert minilm.encode([]).shape == (0, 384)


def test_memo_returns_exactly_a_fresh_encoding_of_the_same_list(minilm):
    fresh = minilm.encode(SENTENCES, batch_size=4)
    first = minilm.encode_memo(SENTENCES, batch_size=4)
    np.testing.assert_array_equal(first, fresh)           # bitwise: same list, same call
    assert minilm.encode_memo(list(SENTENCES), batch_size=4) is first   # remembered
    assert not first.flags.writeable                       # callers cannot corrupt the memo
    other = minilm.encode_memo(SENTENCES[:2], batch_size=4)
    np.testing.assert_array_equal(other, minilm.encode(SENTENCES[:2], batch_size=4))
    minilm.refresh()                                       # weights may have changed: forget
    assert minilm.encode_memo(SENTENCES, batch_size=4) is not first


def test_max_length_is_256_tokens(minilm):
    long = " ".join(["token"] * 600)
    assert len(minilm.token_ids([long])[0]) == 256
    a, b = minilm.encode([long, long + " extra words at the end"])
    np.testing.assert_allclose(a, b, atol=1e-6)  # truncated to the same 256 tokens


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, minilm, torch):
    """A small random BERT folder (MiniLM's tokenizer, gelu, non-default eps)."""
    folder = tmp_path_factory.mktemp("tiny_bert")
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=128,
                                  max_position_embeddings=300, layer_norm_eps=1e-5)
    torch.manual_seed(0)
    transformers.BertModel(cfg).eval().save_pretrained(str(folder))
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm.path / name, folder / name)
    return folder


def test_any_bert_folder_parity(tiny_bert):
    enc = SentenceEncoder.from_pretrained(tiny_bert)
    ours = enc.encode(SENTENCES)
    ref, _ = _reference(tiny_bert, SENTENCES)
    assert ours.shape == (len(SENTENCES), 64)
    assert ((ours * ref).sum(1) >= 0.9999).all()


def _broken_copy(src, dst, **changes):
    shutil.copytree(src, dst, symlinks=True)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture()
def bert_folder(minilm, tmp_path):
    """A BERT folder needing no torch: MiniLM's files, its weights linked rather than copied."""
    folder = tmp_path / "bert"
    folder.mkdir()
    for f in minilm.path.iterdir():
        if f.is_file():
            if f.suffix == ".safetensors":
                (folder / f.name).symlink_to(f.resolve())
            else:
                shutil.copy(f, folder / f.name)
    assert SentenceEncoder.from_pretrained(folder).encode(["ok"]).shape == (1, 384)
    return folder


def test_refusals(bert_folder, tmp_path):
    layers = json.loads((bert_folder / "config.json").read_text())["num_hidden_layers"]
    with pytest.raises(QBudgetError, match="model_type 'llama'"):
        SentenceEncoder.from_pretrained(_broken_copy(bert_folder, tmp_path / "a", model_type="llama"))
    with pytest.raises(QBudgetError, match="shape"):
        SentenceEncoder.from_pretrained(_broken_copy(bert_folder, tmp_path / "b", hidden_size=32,
                                                     num_attention_heads=4))
    with pytest.raises(QBudgetError, match="hidden_act 'swish'"):
        SentenceEncoder.from_pretrained(_broken_copy(bert_folder, tmp_path / "c", hidden_act="swish"))
    no_weights = _broken_copy(bert_folder, tmp_path / "d")
    for f in no_weights.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(QBudgetError, match="no \\*.safetensors"):
        SentenceEncoder.from_pretrained(no_weights)
    with pytest.raises(QBudgetError, match="config.json not found"):
        SentenceEncoder.from_pretrained(tmp_path / "missing")
    more_layers = _broken_copy(bert_folder, tmp_path / "e", num_hidden_layers=layers + 1)
    with pytest.raises(QBudgetError, match="weights missing"):
        SentenceEncoder.from_pretrained(more_layers)
