"""Shared, generic pytest fixtures (each helper may add its own below with care)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

#: Words of the tiny test tokenizer (ids follow the special tokens, in this order).
TINY_WORDS = ("the cat dog sat on a mat ran fast slow red blue green one two three four five "
              "what is why how yes no and or not big small hello world answer question").split()
TINY_SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")


def build_tiny_tokenizer(folder, chat_template: str | None = None):
    """A word-level HF fast tokenizer (whitespace split) saved into ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(list(TINY_SPECIALS) + list(TINY_WORDS) + ["\n"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(pattern=" ", behavior="removed"),
        pre_tokenizers.Split(pattern="\n", behavior="isolated")])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>")
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """Folder with a tiny word-level tokenizer (bos/eos/pad, no chat template)."""
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


# --- one qbudget home for the whole test session ------------------------------------------
# Built worlds and JAX's persistent compile cache live under $QBUDGET_HOME. Pointing it at a
# session-wide temporary folder keeps the user's cache untouched and lets every test (and
# every `qbudget` subprocess a test starts) share one micro world build and one compile cache.
if "QBUDGET_TEST_HOME" not in os.environ:
    import tempfile

    os.environ["QBUDGET_TEST_HOME"] = tempfile.mkdtemp(prefix="qbudget-test-home-")
os.environ["QBUDGET_HOME"] = os.environ["QBUDGET_TEST_HOME"]


@pytest.fixture(scope="session")
def micro_world():
    """The embedded micro world, built once per session into the session's home."""
    from qbudget.runtime import configure_jax
    from qbudget.worlds import get_world

    configure_jax()
    return get_world("micro")
