"""Decoder performance: our flax.nnx CausalLM vs transformers (+ peft) on torch CPU.

Peers: torch (CPU) and peft, next to transformers (already a runtime dependency). Get
them with ``make perf-deps`` (the ``perf`` extra: ``pip install -e '.[perf]'``).

Same Llama checkpoint (hidden 256, 4 layers, 8 heads, vocab 2048), same data, same run:

- LoRA training throughput (tokens/s), batch 16 x 96, rank 8 on q/k/v/o, AdamW;
- greedy generation throughput (new tokens/s), batch 32, prompt 32, 32 new tokens, next to
  the most plain float32 matmuls allow (the call's FLOPs at matmul rates measured at its
  own row counts: prefill and one-token decode steps);
- the training step's achieved GFLOP/s (forward + activation gradients through the frozen
  base + LoRA, counted analytically) next to plain jitted float32 matmuls at the model's
  own shapes, measured here;
- MiniLM encode throughput from ``benchmarks/encoder_bench.py`` (if present).

Every figure is the median of several timed repeats after a warm-up (compilation is not
timed). Both sides run in this one process, so both run under the allocator setting that
``import qbudget`` applies (``qbudget.runtime.configure_allocator``; the JSON says
whether it was applied; ``QBUDGET_MALLOC=system`` runs both without it).
Run: ``python benchmarks/perf_models.py [--quick]`` — prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HIDDEN, LAYERS, HEADS, VOCAB, INTER = 256, 4, 8, 2048, 688
TRAIN_B, TRAIN_T, RANK = 16, 96, 8
GEN_B, GEN_P, GEN_N = 32, 32, 32


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_checkpoint(folder: Path):
    import jax
    from transformers import LlamaConfig

    from qbudget.models import CausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                      num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                      num_key_value_heads=HEADS, max_position_embeddings=256,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=None,
                      pad_token_id=0)
    CausalLM.from_config(cfg, key=jax.random.key(0)).save_pretrained(folder)


def train_batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(3, VOCAB, (TRAIN_B, TRAIN_T)).astype(np.int32)
    loss_mask = np.zeros((TRAIN_B, TRAIN_T), np.float32)
    loss_mask[:, TRAIN_T // 3:] = 1.0
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": loss_mask}


class _FixedBatcher:
    def __init__(self, batch):
        self.b = batch

    def sample(self, rng=None):
        return self.b


def training_flops() -> float:
    """FLOPs of one LoRA step: forward + activation grads through the base + LoRA (fwd+bwd)."""
    tokens = TRAIN_B * TRAIN_T
    lin = LAYERS * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTER) + HIDDEN * VOCAB   # MACs/token
    attn = LAYERS * 2 * TRAIN_T * HIDDEN                                       # QK^T and PV
    lora = LAYERS * 4 * (HIDDEN * RANK + RANK * HIDDEN)
    fwd = 2 * (lin + attn + lora) * tokens
    bwd = 2 * (lin + 2 * attn + 2 * lora) * tokens     # dX of every matmul; dA, dB; attn 2x
    return float(fwd + bwd)


def generation_flops() -> tuple[float, float]:
    """FLOPs of one greedy generate call, (prefill, decode): the prompts' prefill (lm head
    on the last position only, as both sides compute it) and GEN_N - 1 one-token decode
    steps over the cache."""
    lin = LAYERS * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTER)                 # MACs/token
    head = HIDDEN * VOCAB
    prefill = GEN_B * (GEN_P * (lin + LAYERS * 2 * GEN_P * HIDDEN) + head)
    decode = (GEN_N - 1) * GEN_B * (lin + head + LAYERS * 2 * (GEN_P + GEN_N) * HIDDEN)
    return 2.0 * prefill, 2.0 * decode


def bench_ours_train(folder, steps, repeats):
    import jax
    from flax import nnx

    from qbudget.models import CausalLM
    from qbudget.models.lora import attach_lora
    from qbudget.models.train import make_optimizer, train_steps

    model = CausalLM.from_pretrained(folder)
    attach_lora(model, rank=RANK, alpha=16, key=jax.random.key(1))
    opt = make_optimizer(model, 1e-4, wrt=nnx.LoRAParam)
    batcher = _FixedBatcher(train_batch())
    rng = np.random.default_rng(0)
    train_steps(model, opt, batcher, 2, rng=rng)          # compile + warm-up
    t = _median_time(lambda: train_steps(model, opt, batcher, steps, rng=rng), repeats)
    return TRAIN_B * TRAIN_T * steps / t, t / steps


def bench_torch_train(folder, steps, repeats):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=["q_proj", "k_proj", "v_proj",
                                                             "o_proj"]))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    b = train_batch()
    ids = torch.tensor(b["input_ids"], dtype=torch.long)
    labels = ids.clone()
    labels[torch.tensor(b["loss_mask"]) == 0] = -100

    def run(n):
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            out = model(input_ids=ids, labels=labels)
            out.loss.backward()
            opt.step()

    run(2)
    t = _median_time(lambda: run(steps), repeats)
    return TRAIN_B * TRAIN_T * steps / t


def gen_prompts():
    rng = np.random.default_rng(1)
    return rng.integers(3, VOCAB, (GEN_B, GEN_P)).astype(np.int64)


def bench_ours_generate(folder, repeats):
    from qbudget.models import CausalLM
    from qbudget.models.generate import generate

    model = CausalLM.from_pretrained(folder)
    prompts = gen_prompts().tolist()

    def run():
        out = generate(model, prompts, max_new_tokens=GEN_N, batch_size=GEN_B, eos_token_id=-1)
        assert all(len(r) == GEN_N for r in out)
        return out

    first = run()
    t = _median_time(run, repeats)
    return GEN_B * GEN_N / t, first


def bench_torch_generate(folder, repeats):
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ids = torch.tensor(gen_prompts())
    mask = torch.ones_like(ids)

    def run():
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=GEN_N,
                                  min_new_tokens=GEN_N, do_sample=False, pad_token_id=0)

    first = run()[:, GEN_P:].tolist()
    t = _median_time(run, repeats)
    return GEN_B * GEN_N / t, first


def bench_matmul(repeats, tokens: int = TRAIN_B * TRAIN_T, include_head: bool = True):
    """GFLOP/s of plain jitted float32 matmuls at the model's own shapes with ``tokens`` rows
    (default: the training step's). Calls are queued back to back and synchronised once per
    batch of 20, as a compiled step issues them; syncing after every call would add the
    dispatch round trip to each and understate the rate (here ~88 against a median of ~105 GFLOP/s)."""
    import jax
    import jax.numpy as jnp

    shapes = [(HIDDEN, HIDDEN, 4 * LAYERS), (HIDDEN, INTER, 2 * LAYERS), (INTER, HIDDEN, LAYERS)]
    if include_head:
        shapes.append((HIDDEN, VOCAB, 1))
    total_flops, total_time = 0.0, 0.0
    for din, dout, count in shapes:
        x = jax.random.normal(jax.random.key(0), (tokens, din), jnp.float32)
        w = jax.random.normal(jax.random.key(1), (din, dout), jnp.float32)
        f = jax.jit(lambda a, b: a @ b)
        f(x, w).block_until_ready()
        inner = 20

        def run():
            for _ in range(inner):
                y = f(x, w)
            y.block_until_ready()

        t = _median_time(run, repeats)
        total_flops += 2.0 * tokens * din * dout * count
        total_time += t / inner * count
    return total_flops / total_time / 1e9


def generation_bound_s(repeats) -> float:
    """Least time the float32 matmuls of one generate call can take: the prefill's FLOPs at
    the matmul rate measured with GEN_B * GEN_P rows, each decode step's at the rate with
    GEN_B rows (32-row matmuls run far below the large-matmul rate on CPU)."""
    prefill_flops, decode_flops = generation_flops()
    prefill_rate = bench_matmul(repeats, tokens=GEN_B * GEN_P, include_head=False)
    decode_rate = bench_matmul(repeats, tokens=GEN_B)
    return prefill_flops / (prefill_rate * 1e9) + decode_flops / (decode_rate * 1e9)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--no-encoder", action="store_true", help="skip the MiniLM comparison")
    args = ap.parse_args(argv)
    repeats, steps = (3, 3) if args.quick else (5, 5)
    threads = os.cpu_count() or 1
    from qbudget.runtime import configure_allocator   # import qbudget applies it

    import torch

    torch.set_num_threads(threads)
    result = {"config": {"hidden": HIDDEN, "layers": LAYERS, "heads": HEADS, "vocab": VOCAB,
                         "intermediate": INTER, "train_batch": [TRAIN_B, TRAIN_T],
                         "lora_rank": RANK, "generate": {"batch": GEN_B, "prompt": GEN_P,
                                                         "new_tokens": GEN_N},
                         "repeats": repeats, "cpu_threads": threads,
                         "qbudget_allocator": configure_allocator()}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "llama"
        make_checkpoint(folder)
        ours_tps, step_s = bench_ours_train(folder, steps, repeats)
        torch_tps = bench_torch_train(folder, steps, repeats)
        flops = training_flops()
        achieved = flops / step_s / 1e9
        matmul = bench_matmul(repeats)
        result["lora_train"] = {"ours_tokens_per_s": round(ours_tps, 1),
                                "torch_peft_tokens_per_s": round(torch_tps, 1),
                                "ratio": round(ours_tps / torch_tps, 3), "target_ratio": 1.3}
        result["train_step_flops"] = {"gflop_per_step": round(flops / 1e9, 3),
                                      "achieved_gflops": round(achieved, 2),
                                      "plain_matmul_gflops": round(matmul, 2),
                                      "fraction_of_matmul": round(achieved / matmul, 3),
                                      "target_fraction": 0.6}
        ours_gen, ours_ids = bench_ours_generate(folder, repeats)
        torch_gen, torch_ids = bench_torch_generate(folder, repeats)
        result["greedy_generate"] = {"ours_new_tokens_per_s": round(ours_gen, 1),
                                     "transformers_new_tokens_per_s": round(torch_gen, 1),
                                     "ratio": round(ours_gen / torch_gen, 3), "target_ratio": 5.0,
                                     "same_token_ids": ours_ids == torch_ids}
        # What the float32 matmuls alone allow: the call's FLOPs at plain jitted matmul
        # rates measured at its own row counts (attention products counted at the same
        # rates), an upper bound on this call's tokens/s on these cores.
        bound = GEN_B * GEN_N / generation_bound_s(repeats)
        result["greedy_generate"].update({
            "gflop_per_call": round(sum(generation_flops()) / 1e9, 3),
            "matmul_bound_new_tokens_per_s": round(bound, 1),
            "matmul_bound_ratio": round(bound / torch_gen, 3)})
    if not args.no_encoder:
        bench_dir = Path(__file__).resolve().parent
        if (bench_dir / "encoder_bench.py").exists():
            sys.path.insert(0, str(bench_dir))
            from encoder_bench import bench_encoder

            result["minilm_encode"] = bench_encoder(n=2000)
        else:
            result["minilm_encode"] = {"skipped": "benchmarks/encoder_bench.py not present"}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
