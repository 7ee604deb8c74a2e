"""Build one embedded world into a folder, deterministically from its spec.

Steps: generate pool and probe prompts; draw a pretraining corpus per model and answer
it with the rule-based generator in that model's house style; train one BPE tokenizer
on all of that text; pretrain the teacher and the (smaller) base student from scratch,
concurrently, with the model stack's training step; write ``world.json`` with every
file's checksum.
Same spec on the same machine -> byte-identical files.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from qbudget.pool import save_prompts
from qbudget.worlds import cache
from qbudget.worlds.prompts import Task, corpus_tasks, generate_pool_and_probe, to_prompts
from qbudget.worlds.responses import STUDENT, TEACHER, HouseStyle, respond
from qbudget.worlds.specs import CATEGORIES, SPEC_VERSION, ModelSpec, WorldSpec
from qbudget.worlds.tokenizer import save_tokenizer, special_ids, train_tokenizer


def answer_corpus(tasks: list[Task], style: HouseStyle, seed: int) -> list[tuple[str, str]]:
    """(prompt, response) pairs in ``style``; one seeded stream per corpus."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5EED, len(style.name)]))
    return [(t.text, respond(t, style, rng)) for t in tasks]


def house_styles(spec: WorldSpec) -> dict[str, HouseStyle]:
    """The teacher's and the student's house styles in world ``spec`` (its habit rate)."""
    return {"teacher": TEACHER,
            "student": dataclasses.replace(STUDENT, habit_prob=spec.habit_prob)}


def hf_config(m: ModelSpec, vocab_size: int, max_len: int, ids: dict[str, int]):
    """The transformers config (Qwen2Config or LlamaConfig) of one tiny model."""
    from transformers import LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=m.hidden_size,
                  intermediate_size=m.intermediate_size, num_hidden_layers=m.num_layers,
                  num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
                  max_position_embeddings=max(128, 2 * max_len), rms_norm_eps=1e-6,
                  tie_word_embeddings=True, bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                  pad_token_id=ids["pad"])
    if m.architecture == "qwen2":
        return Qwen2Config(**common, rope_theta=10000.0, use_sliding_window=False)
    if m.architecture == "llama":
        return LlamaConfig(**common, rope_theta=10000.0, attention_bias=False, mlp_bias=False)
    raise ValueError(f"unknown architecture {m.architecture!r}")


def pretrain(m: ModelSpec, config, tokenizer, pairs: list[tuple[str, str]], max_len: int,
             seed: int, out: Path) -> list[float]:
    """Full-parameter pretraining of a fresh model on ``pairs``; saves an HF folder."""
    import jax
    from flax import nnx

    from qbudget.models import CausalLM
    from qbudget.models.train import PairBatcher, make_optimizer, train_steps

    key = jax.random.key(seed)
    init_key, data_key, train_key = jax.random.split(key, 3)
    lm = CausalLM.from_config(config, key=init_key)
    batcher = PairBatcher(tokenizer, pairs, batch_size=m.batch_size, max_len=max_len,
                          bucket=max_len, key=data_key)   # one shape: one compile
    opt = make_optimizer(lm, m.learning_rate, wrt=nnx.Param, decay_steps=m.steps)
    losses = [float(x) for x in train_steps(lm, opt, batcher, m.steps, train_key)]
    lm.save_pretrained(out)
    return losses


def build_into(spec: WorldSpec, out: Path, say: Callable[[str], None] = lambda m: None) -> dict:
    """Write every file of world ``spec`` into the (empty) folder ``out``; return world.json."""
    from qbudget.runtime import configure_jax

    configure_jax()                  # persistent compile cache: rebuilds skip XLA compiles
    out = Path(out)
    t0 = time.perf_counter()
    pool_tasks, probe_tasks, is_train = generate_pool_and_probe(spec)
    save_prompts(to_prompts(pool_tasks, "pool"), out / "pool.jsonl")
    save_prompts(to_prompts(probe_tasks, "probe", is_train), out / "probe.jsonl")

    corpora = {}
    styles = house_styles(spec)
    for who, m in (("teacher", spec.teacher), ("student", spec.student)):
        tasks = corpus_tasks(spec.seed, who, m.train_prompts, m.corpus_weights)
        corpora[who] = answer_corpus(tasks, styles[who], spec.seed)
    texts = [t.text for t in pool_tasks] + [t.text for t in probe_tasks]
    texts += [s for pairs in corpora.values() for pair in pairs for s in pair]
    tok = train_tokenizer(texts, spec.vocab_size)
    ids = special_ids(tok)
    say(f"[{spec.name}] prompts, corpora and tokenizer ({tok.get_vocab_size()} tokens) "
        f"in {time.perf_counter() - t0:.1f} s")

    models = (("teacher", spec.teacher), ("student", spec.student))
    # configs and tokenizers first, in this thread: transformers' lazy imports are not
    # thread-safe
    configs = {who: hf_config(m, tok.get_vocab_size(), spec.max_len, ids) for who, m in models}
    for who, _ in models:
        save_tokenizer(tok, out / who, model_max_length=4 * spec.max_len)
    from qbudget.models import load_tokenizer

    tokenizers = {who: load_tokenizer(out / who) for who, _ in models}

    final_loss: dict[str, float] = {}
    failed: dict[str, BaseException] = {}

    def train(i: int, who: str, m: ModelSpec) -> None:
        t1 = time.perf_counter()
        try:
            losses = pretrain(m, configs[who], tokenizers[who], corpora[who], spec.max_len,
                              spec.seed * 1000 + i, out / who)
        except BaseException as exc:  # noqa: BLE001  (re-raised in the main thread)
            failed[who] = exc
            return
        final_loss[who] = round(float(np.mean(losses[-max(1, len(losses) // 10):])), 4)
        say(f"[{spec.name}] {who} ({m.architecture}, {spec.params(who):,} params): "
            f"{m.steps} steps, final loss {final_loss[who]:.3f}, {time.perf_counter() - t1:.1f} s")

    # Teacher and student pretrain at the same time, one thread each: the models are too
    # small for one training to keep two cores busy (~170% CPU alone), and each result is
    # independent of the other (own seed, own batches, own compiled program), so the
    # files are byte-identical to training them one after the other. Daemon threads, so
    # Ctrl-C ends the build at once (it writes into a temporary folder: nothing is lost).
    threads = [threading.Thread(target=train, args=(i, who, m), daemon=True, name=f"pretrain-{who}")
               for i, (who, m) in enumerate(models)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for who, _ in models:
        if who in failed:
            raise failed[who]

    info = {
        "name": spec.name,
        "version": SPEC_VERSION,
        "architecture": spec.architecture,
        "seed": spec.seed,
        "categories": list(CATEGORIES),
        "sizes": {"pool": len(pool_tasks), "probe": len(probe_tasks),
                  "probe_train": int(is_train.sum()), "probe_test": int((~is_train).sum()),
                  "vocab": tok.get_vocab_size(),
                  "teacher_params": spec.params("teacher"),
                  "student_params": spec.params("student")},
        "sampling": dict(spec.sampling),
        "pretraining_loss": final_loss,
        "spec": spec.to_json(),
        "files": cache.checksums(out),
    }
    (out / cache.WORLD_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n",
                                        encoding="utf-8")
    say(f"[{spec.name}] built in {time.perf_counter() - t0:.1f} s")
    return info
