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


def _configure_jax_read_only(_configure=None):
    """This pytest process reads JAX's persistent compile cache but never writes it.

    Why: late in a long in-process session (hundreds of tests, thousands of compiles and
    freed executables), writing a cache entry crashed the process inside the C++ unwinder
    (libgcc_s) while XLA serialized an executable, three times across two sessions. The
    ``qbudget`` subprocesses the tests start still write and read the cache as users' do.
    """
    import jax

    _configure()
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float("inf"))


def _install_read_only_cache() -> None:
    import functools

    import qbudget.runtime as runtime

    runtime.configure_jax = functools.partial(_configure_jax_read_only,
                                              _configure=runtime.configure_jax)


_install_read_only_cache()


@pytest.fixture(scope="session")
def micro_world():
    """The embedded micro world, built once per session into the session's home."""
    from qbudget.runtime import configure_jax
    from qbudget.worlds import get_world

    configure_jax()
    return get_world("micro")


# --- a spy on the teacher oracle ------------------------------------------------------------
# "Each prompt is paid once" is a claim about the oracle, so tests count at the oracle: the
# real oracle classes (LocalModelOracle, ReplayOracle, HttpOracle) keep answering, and each
# answered prompt is appended to a log file once the call returns. The same code serves
# in-process tests (``OracleSpy.install(monkeypatch)``) and subprocesses, including the
# spawned workers of a sweep: ``OracleSpy.env()`` puts a ``sitecustomize.py`` on PYTHONPATH
# that patches the classes as soon as their modules are imported (wherever the loop gets its
# oracle from), and, with ``kill_at_call=N``, SIGKILLs the process on entering its N-th
# oracle call (with ``kill_prefix``: its N-th call for prompts whose ids start so), before the
# call answers anything: e.g. a kill mid-purchase, budget reserved, no answer arrived yet.

ORACLE_SPY_SOURCE = r'''
"""Test-only oracle spy (written by tests/conftest.py); inert unless QBUDGET_ORACLE_SPY is set."""
import hashlib
import importlib.abc
import json
import os
import signal
import sys

SPIED = {"qbudget.oracles.local": "LocalModelOracle", "qbudget.oracles.replay": "ReplayOracle",
         "qbudget.oracles.http": "HttpOracle"}
_calls = [0]


def _method(cls):
    """The method every answer goes through: ``answer_usage`` where the class has it (its
    ``answer`` calls it; the ledger calls it directly), else ``answer``."""
    return "answer_usage" if hasattr(cls, "answer_usage") else "answer"


def _wrap(cls, log_path, kill_at_call, kill_prefix):
    original = getattr(cls, _method(cls))

    def answer(self, prompts, *args, **kwargs):
        if kill_at_call and any(p.id.startswith(kill_prefix) for p in prompts):
            _calls[0] += 1
            if _calls[0] == kill_at_call:
                os.kill(os.getpid(), signal.SIGKILL)
        out = original(self, prompts, *args, **kwargs)
        sample = kwargs.get("sample", args[0] if args else 0)
        lines = "".join(json.dumps({
            "pid": os.getpid(), "oracle": self.fingerprint, "name": self.name, "id": p.id,
            "sha": hashlib.sha256(p.text.encode("utf-8")).hexdigest(), "sample": int(sample),
        }) + "\n" for p in prompts)
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, lines.encode("utf-8"))
        finally:
            os.close(fd)
        return out

    answer.__wrapped__ = original
    return answer


def patch_module(module, log_path, kill_at_call=0, kill_prefix="", setattr_=setattr):
    cls = getattr(module, SPIED[module.__name__])
    setattr_(cls, _method(cls), _wrap(cls, log_path, kill_at_call, kill_prefix))


class _Loader(importlib.abc.Loader):
    def __init__(self, inner, log_path, kill):
        self.inner, self.log_path, self.kill = inner, log_path, kill

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        patch_module(module, self.log_path, *self.kill)

    def __getattr__(self, name):            # get_filename, get_source, ... of the real loader
        return getattr(self.inner, name)


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self, log_path, kill):
        self.log_path, self.kill = log_path, kill

    def find_spec(self, name, path, target=None):
        if name not in SPIED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                spec.loader = _Loader(spec.loader, self.log_path, self.kill)
                return spec
        return None


if os.environ.get("QBUDGET_ORACLE_SPY") and __name__ == "sitecustomize":
    _n, _, _prefix = (os.environ.get("QBUDGET_ORACLE_SPY_KILL_AT_CALL") or "0").partition(":")
    sys.meta_path.insert(0, _Finder(os.environ["QBUDGET_ORACLE_SPY"], (int(_n), _prefix)))
'''


class OracleSpy:
    """Counts what the real teacher oracle answers (see ORACLE_SPY_SOURCE above)."""

    def __init__(self, folder):
        from pathlib import Path

        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "sitecustomize.py").write_text(ORACLE_SPY_SOURCE)
        self.log = self.folder / "answered.jsonl"

    def env(self, kill_at_call: int = 0, kill_prefix: str = "") -> dict:
        """Environment for a subprocess (and its spawned workers) that logs into ``self.log``;
        ``kill_at_call=N``: SIGKILL on entering the N-th oracle call (counting only calls for
        prompt ids starting with ``kill_prefix``), before it answers."""
        env = os.environ.copy()
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.folder),
                                                          env.get("PYTHONPATH")]))
        env["QBUDGET_ORACLE_SPY"] = str(self.log)
        env["QBUDGET_ORACLE_SPY_KILL_AT_CALL"] = f"{int(kill_at_call)}:{kill_prefix}"
        return env

    def install(self, monkeypatch) -> "OracleSpy":
        """Spy on the oracle classes of this process until the test ends."""
        import importlib
        import importlib.util

        spec = importlib.util.spec_from_file_location("qbudget_test_oracle_spy",
                                                      self.folder / "sitecustomize.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        for name in mod.SPIED:
            mod.patch_module(importlib.import_module(name), str(self.log),
                             setattr_=monkeypatch.setattr)
        return self

    def calls(self) -> list[dict]:
        """One entry per prompt the oracle answered: pid, oracle, name, id, sha, sample."""
        import json

        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]

    def answered(self, ids=None, sample: int | None = None) -> list[dict]:
        """The entries for prompts in ``ids`` (all if None), of one sample (all if None)."""
        ids = None if ids is None else set(ids)
        return [c for c in self.calls() if (ids is None or c["id"] in ids)
                and (sample is None or c["sample"] == sample)]


def ledger_oracle_fingerprint(ledger_path) -> str:
    """The fingerprint of the oracle a run's ledger bought from (its meta table)."""
    import sqlite3

    con = sqlite3.connect(str(ledger_path))
    try:
        return con.execute("SELECT value FROM meta WHERE key='oracle_fingerprint'").fetchone()[0]
    finally:
        con.close()


@pytest.fixture
def oracle_spy(tmp_path_factory) -> OracleSpy:
    """A fresh, not yet installed OracleSpy (``.install(monkeypatch)`` or ``.env()``)."""
    return OracleSpy(tmp_path_factory.mktemp("oracle_spy"))


@pytest.fixture(autouse=True)
def _release_compiled_code_when_crowded():
    """Between tests, drop JAX's compiled executables once the process's memory maps reach
    half the kernel's limit, as sweep workers do between cells (see
    :func:`qbudget.runtime.release_compiled_code_if_crowded`)."""
    yield
    from qbudget.runtime import release_compiled_code_if_crowded

    release_compiled_code_if_crowded()
