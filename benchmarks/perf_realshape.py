"""Decoder performance at a real student's width: a Qwen2.5-0.5B-shaped decoder, ours
(flax.nnx ``CausalLM``) vs transformers (+ peft) on torch CPU, float32.

Peers: torch (CPU) and peft, next to transformers (already a runtime dependency). Get
them with ``make perf-deps`` (the ``perf`` extra: ``pip install -e '.[perf]'``).

The checkpoint is Qwen2.5-0.5B's real config (model_type qwen2, hidden 896, 14 heads, 2 KV
heads, intermediate 4,864, vocab 151,936, tied embeddings, rope_theta 1e6, rms eps 1e-6,
q/k/v bias) with random weights (transformers' own init, ``Qwen2ForCausalLM`` from_config,
``save_pretrained``), and ``--layers`` of its 24 decoder layers (default 2: on the 2-core machine it was written
on, 2 layers took 3 minutes with the cores nearly idle and 9.4 minutes shared with other
sessions (load average 3-7); 4 layers took 33 minutes at load average 9-13. Pass
``--layers 4`` or more where the cores are idle. The lm head at vocab 151,936 alone costs about as much as 9
layers, so fewer layers weigh the head more). Same data, same run:

- LoRA training throughput (tokens/s), batch 8 x 256, rank 8 on all seven projections
  (q/k/v/o, gate/up/down), AdamW, the same masked next-token loss: each row is a prompt of
  48-128 tokens (seeded) and its answer to 256, loss on the answer only (about two thirds
  of the positions), as in distillation: qbudget's ``train_steps`` vs transformers + peft.
  Ours computes the lm head only at the target positions (``train.head_rows``);
  transformers + peft computes full logits and masks the loss, as HF's loss does;
- greedy generation throughput (new tokens/s), batch 8, prompt 64, 64 new tokens:
  ``qbudget.models.generate`` vs transformers ``generate(do_sample=False)``, with the share
  of rows whose token ids are equal, next to the most plain float32 matmuls allow;
- the training step's achieved GFLOP/s (forward + activation gradients through the frozen
  base + LoRA, counted analytically, as perf_models counts them) next to plain jitted
  float32 matmuls at the step's own shapes (the fused projections and the lm head, 2,048
  rows), measured here;
- load time and peak resident memory of ``CausalLM.from_pretrained`` on a bfloat16 copy
  of the checkpoint (and on the float32 one), each in a fresh subprocess: the rise of
  VmHWM over the RSS just before the call, next to the size of the loaded weights. A load
  that fails (e.g. bfloat16 safetensors not supported yet) is reported with its error.

Training and generation figures are medians of several timed calls after a warm-up
(compilation is not timed), ours and the peer's calls interleaved one by one so that the
shared machine's load changes hit both sides alike. Both sides run in this one process under the allocator setting
``import qbudget`` applies (``qbudget.runtime.configure_allocator``; ``QBUDGET_MALLOC=system``
runs both without it). Run: ``python benchmarks/perf_realshape.py [--layers N] [--quick]``
— prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# Qwen2.5-0.5B
HIDDEN, HEADS, KV_HEADS, INTER, VOCAB, FULL_LAYERS = 896, 14, 2, 4864, 151936, 24
HEAD_DIM = HIDDEN // HEADS
DEFAULT_LAYERS = 2
TRAIN_B, TRAIN_T, RANK, ALPHA = 8, 256, 8, 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GEN_B, GEN_P, GEN_N = 8, 64, 64
LR = 1e-4


def _median(times):
    return statistics.median(times)


def _timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def qwen_config(layers: int):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
        num_hidden_layers=layers, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        hidden_act="silu", max_position_embeddings=32768, initializer_range=0.02,
        rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        use_sliding_window=False, sliding_window=32768, max_window_layers=layers,
        attention_dropout=0.0, bos_token_id=151643, eos_token_id=151643)


def make_checkpoints(f32: Path, bf16: Path, layers: int) -> None:
    """Random Qwen2.5-0.5B-shaped weights (transformers' init, seed 0) as an HF folder in
    float32, and the same weights in bfloat16 in another folder."""
    import torch
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(qwen_config(layers)).to(torch.float32).eval()
    model.save_pretrained(str(f32))
    model.to(torch.bfloat16).save_pretrained(str(bf16))
    del model


#: Each training row is a prompt of PROMPT_MIN..PROMPT_MAX tokens (seeded, uniform) followed
#: by the answer up to TRAIN_T: the loss is on the answer only, as in distillation (about
#: two thirds of the positions; see ``split`` in the JSON).
PROMPT_MIN, PROMPT_MAX = 48, 128


def prompt_lengths():
    return np.random.default_rng(2).integers(PROMPT_MIN, PROMPT_MAX + 1, TRAIN_B)


def train_batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(3, VOCAB, (TRAIN_B, TRAIN_T)).astype(np.int32)
    loss_mask = np.zeros((TRAIN_B, TRAIN_T), np.float32)
    for row, p in enumerate(prompt_lengths()):
        loss_mask[row, p:] = 1.0
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": loss_mask}


def train_split() -> dict:
    """The benchmark's prompt/answer split, as the JSON reports it."""
    p = prompt_lengths()
    b = train_batch()
    targets = int(np.count_nonzero(b["loss_mask"][:, 1:]))
    return {"prompt_tokens_per_row": [int(x) for x in p],
            "answer_tokens_per_row": [int(TRAIN_T - x) for x in p],
            "target_positions": targets, "positions": TRAIN_B * TRAIN_T,
            "target_share": round(targets / (TRAIN_B * TRAIN_T), 3)}


class _FixedBatcher:
    def __init__(self, batch):
        self.b = batch

    def sample(self, rng=None):
        return self.b


def _layer_macs() -> int:
    """Multiply-accumulates per token of one layer's seven projections."""
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    return HIDDEN * q + 2 * HIDDEN * kv + q * HIDDEN + 3 * HIDDEN * INTER


def _lora_macs() -> int:
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    dims = [(HIDDEN, q), (HIDDEN, kv), (HIDDEN, kv), (q, HIDDEN),
            (HIDDEN, INTER), (HIDDEN, INTER), (INTER, HIDDEN)]
    return sum(RANK * (i + o) for i, o in dims)


def training_flops(layers: int, head_rows: int | None = None) -> dict:
    """FLOPs of one LoRA step, counted as perf_models counts them: forward + activation
    gradients through the frozen base (no base weight gradients) + LoRA forward/backward,
    attention products (causal masking not subtracted), the tied lm head (forward and its
    input gradient) on ``head_rows`` rows (default: every position). Split by part, to see
    where the work is."""
    tokens = TRAIN_B * TRAIN_T
    lin = layers * _layer_macs()
    attn = layers * 2 * TRAIN_T * HEADS * HEAD_DIM       # QK^T and PV per token
    lora = layers * _lora_macs()
    head = HIDDEN * VOCAB
    parts = {"layers_linear": 2 * 2 * lin * tokens, "attention": 2 * 3 * attn * tokens,
             "lora": 2 * 3 * lora * tokens, "lm_head": 2 * 2 * head * (head_rows or tokens)}
    parts["total"] = sum(parts.values())
    return {k: float(v) for k, v in parts.items()}


def generation_flops(layers: int) -> tuple[float, float]:
    """(prefill, decode) FLOPs of one greedy generate call: the prompts' prefill (lm head
    on the last position only) and GEN_N - 1 one-token decode steps over the cache."""
    lin = layers * _layer_macs()
    head = HIDDEN * VOCAB
    prefill = GEN_B * (GEN_P * (lin + layers * 2 * GEN_P * HIDDEN) + head)
    decode = (GEN_N - 1) * GEN_B * (lin + head + layers * 2 * (GEN_P + GEN_N) * HIDDEN)
    return 2.0 * prefill, 2.0 * decode


def _matmul_shapes(layers: int, include_head: bool = True):
    """(in, out, count) of the matmuls our decoder issues: q/k/v fused, o, gate/up fused,
    down, and the tied lm head."""
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    shapes = [(HIDDEN, q + 2 * kv, layers), (q, HIDDEN, layers), (HIDDEN, 2 * INTER, layers),
              (INTER, HIDDEN, layers)]
    if include_head:
        shapes.append((HIDDEN, VOCAB, 1))
    return shapes


def bench_matmul(layers: int, repeats: int, tokens: int = TRAIN_B * TRAIN_T,
                 include_head: bool = True) -> dict:
    """GFLOP/s of plain jitted float32 ``x @ w`` at the decoder's shapes with ``tokens`` rows,
    queued back to back (synchronised once per batch of calls, as a compiled step issues
    them); per shape and overall (weighted by how often each occurs in a forward pass)."""
    import jax
    import jax.numpy as jnp

    total_flops, total_time, per_shape = 0.0, 0.0, {}
    for din, dout, count in _matmul_shapes(layers, include_head):
        x = jax.random.normal(jax.random.key(0), (tokens, din), jnp.float32)
        w = jax.random.normal(jax.random.key(1), (din, dout), jnp.float32)
        f = jax.jit(lambda a, b: a @ b)
        f(x, w).block_until_ready()
        flops = 2.0 * tokens * din * dout
        inner = max(2, min(20, int(2e10 / flops)))

        def run():
            for _ in range(inner):
                y = f(x, w)
            y.block_until_ready()

        t = _median(_timed(run, repeats)) / inner
        per_shape[f"{din}x{dout}"] = round(flops / t / 1e9, 1)
        total_flops += flops * count
        total_time += t * count
        del x, w
    return {"gflops": total_flops / total_time / 1e9, "per_shape": per_shape}


def _interleaved(fns: dict, repeats: int) -> dict:
    """Time each callable ``repeats`` times, alternating between them call by call, so a
    change in the machine's load hits every side alike."""
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].extend(_timed(fn, 1))
    return times


def ours_train(folder):
    """(one-step callable, compile + first step seconds, first loss, head rows)."""
    import jax
    from flax import nnx

    from qbudget.models import CausalLM
    from qbudget.models.lora import attach_lora
    from qbudget.models.train import head_rows, make_optimizer, train_steps

    model = CausalLM.from_pretrained(folder)
    attach_lora(model, rank=RANK, alpha=ALPHA, targets=TARGETS, key=jax.random.key(1))
    opt = make_optimizer(model, LR, wrt=nnx.LoRAParam)
    batcher = _FixedBatcher(train_batch())
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    first = train_steps(model, opt, batcher, 1, rng=rng)          # compile + warm-up
    compile_s = time.perf_counter() - t0
    rows = head_rows(model, train_batch()["loss_mask"])
    return (lambda: train_steps(model, opt, batcher, 1, rng=rng)), compile_s, \
        float(first[0]), rows


def torch_train(folder):
    """(one-step callable, first loss)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                             target_modules=list(TARGETS)))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    b = train_batch()
    ids = torch.tensor(b["input_ids"], dtype=torch.long)
    labels = ids.clone()
    labels[torch.tensor(b["loss_mask"]) == 0] = -100
    losses = []

    def step():
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss))

    step()                                               # warm-up
    return step, losses[0]


def gen_prompts():
    rng = np.random.default_rng(1)
    return rng.integers(3, VOCAB, (GEN_B, GEN_P)).astype(np.int64)


def ours_generate(folder):
    """(one-call callable, first call's ids, compile + first call seconds)."""
    from qbudget.models import CausalLM
    from qbudget.models.generate import generate

    model = CausalLM.from_pretrained(folder)
    prompts = gen_prompts().tolist()

    def run():
        out = generate(model, prompts, max_new_tokens=GEN_N, batch_size=GEN_B, eos_token_id=-1)
        assert all(len(r) == GEN_N for r in out)
        return out

    t0 = time.perf_counter()
    first = run()
    compile_s = time.perf_counter() - t0
    return run, first, compile_s


def torch_generate(folder):
    """(one-call callable, first call's new ids)."""
    import torch
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None      # never stop early (ours: eos -1)
    ids = torch.tensor(gen_prompts())
    mask = torch.ones_like(ids)

    def run():
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=GEN_N,
                                 do_sample=False, pad_token_id=0)
        assert out.shape[1] == GEN_P + GEN_N
        return out

    first = run()[:, GEN_P:].tolist()
    return run, first


def generation_bound_s(layers, repeats) -> float:
    """Least time the float32 matmuls of one generate call can take: the prefill's FLOPs at
    the matmul rate with GEN_B * GEN_P rows, each decode step's at the rate with GEN_B rows."""
    prefill_flops, decode_flops = generation_flops(layers)
    prefill_rate = bench_matmul(layers, repeats, tokens=GEN_B * GEN_P, include_head=False)
    decode_rate = bench_matmul(layers, repeats, tokens=GEN_B)
    return (prefill_flops / (prefill_rate["gflops"] * 1e9)
            + decode_flops / (decode_rate["gflops"] * 1e9))


_LOAD_PROBE = r"""
import json, sys, time, inspect
import qbudget                                   # the allocator setting, as in a run
import jax, jax.numpy as jnp
from flax import nnx
from safetensors import safe_open                # imports the loader needs, before the baseline
from transformers import AutoConfig
from qbudget.models import CausalLM
import qbudget.models.checkpoint

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None

path, compute = sys.argv[1], sys.argv[2]
jnp.zeros(1).block_until_ready()
AutoConfig.from_pretrained(path, local_files_only=True)
kwargs = {}
if compute != "default":
    params = inspect.signature(CausalLM.from_pretrained).parameters
    name = "compute_dtype" if "compute_dtype" in params else "dtype"
    kwargs[name] = getattr(jnp, compute)
rss0, hwm0 = status("VmRSS"), status("VmHWM")
t0 = time.perf_counter()
res = {"kwargs": {k: str(jnp.dtype(v)) for k, v in kwargs.items()}}
try:
    model = CausalLM.from_pretrained(path, **kwargs)
    leaves = jax.tree.leaves(nnx.state(model))
    jax.block_until_ready(leaves)
    res["load_s"] = time.perf_counter() - t0
    res["weights_bytes"] = int(sum(x.nbytes for x in leaves))
    res["weight_dtypes"] = sorted({str(x.dtype) for x in leaves})
    res["model_dtype"] = str(model.dtype)
except Exception as e:
    res["error"] = f"{type(e).__name__}: {e}"
hwm = status("VmHWM")
res.update({"rss_before_bytes": rss0, "hwm_before_bytes": hwm0, "hwm_after_bytes": hwm,
            "peak_rise_bytes": hwm - rss0})
print(json.dumps(res))
"""


def bench_load(folder: Path, compute: str = "default") -> dict:
    """``CausalLM.from_pretrained(folder)`` in a fresh process: seconds, the rise of the
    resident high-water mark over the RSS just before the call, the loaded weights' bytes.
    ``compute``: "default", or a dtype name passed as the compute-dtype keyword."""
    proc = subprocess.run([sys.executable, "-c", _LOAD_PROBE, str(folder), compute],
                          capture_output=True, text=True, timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        return {"error": f"probe exited {proc.returncode}: {proc.stderr.strip()[-800:]}"}
    res = json.loads(lines[-1])
    ckpt = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    out = {"checkpoint_bytes": ckpt, "compute": compute, **res}
    if "error" not in res:
        out["load_s"] = round(res["load_s"], 3)
        out["peak_rise_over_weights"] = round(res["peak_rise_bytes"] / res["weights_bytes"], 3)
        out["target_peak_over_weights"] = 1.3
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=DEFAULT_LAYERS,
                    help=f"decoder layers of the {FULL_LAYERS} (default {DEFAULT_LAYERS})")
    ap.add_argument("--quick", action="store_true", help="fewer timed repeats")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: "
                    "train,generate,matmul,load")
    args = ap.parse_args(argv)
    if not 1 <= args.layers <= FULL_LAYERS:
        ap.error(f"--layers must be in 1..{FULL_LAYERS}")
    skip = {s for s in args.skip.split(",") if s}
    layers = args.layers
    steps, repeats = (2, 2) if args.quick else (3, 3)
    wall0 = time.perf_counter()
    from qbudget.runtime import available_cores, configure_allocator   # import qbudget applies it

    import torch

    threads = available_cores()
    torch.set_num_threads(threads)
    result = {"config": {"model": "Qwen2.5-0.5B shape, random weights", "layers": layers,
                         "of_layers": FULL_LAYERS, "hidden": HIDDEN, "heads": HEADS,
                         "kv_heads": KV_HEADS, "intermediate": INTER, "vocab": VOCAB,
                         "tied_embeddings": True, "dtype": "float32",
                         "train_batch": [TRAIN_B, TRAIN_T], "lora_rank": RANK,
                         "lora_targets": list(TARGETS), "timed_train_steps": steps,
                         "generate": {"batch": GEN_B, "prompt": GEN_P, "new_tokens": GEN_N},
                         "repeats": repeats, "cpu_threads": threads,
                         "torch_threads": torch.get_num_threads(),
                         "qbudget_allocator": configure_allocator()}}
    with tempfile.TemporaryDirectory() as tmp:
        f32, bf16 = Path(tmp) / "qwen-f32", Path(tmp) / "qwen-bf16"
        t0 = time.perf_counter()
        make_checkpoints(f32, bf16, layers)
        result["config"]["checkpoint_build_s"] = round(time.perf_counter() - t0, 1)
        tokens = TRAIN_B * TRAIN_T
        if "train" not in skip:
            o_step, o_compile, o_loss, o_rows = ours_train(f32)
            t_step, t_loss = torch_train(f32)
            times = _interleaved({"ours": o_step, "torch": t_step}, steps)
            del o_step, t_step
            o_s, t_s = _median(times["ours"]), _median(times["torch"])
            result["lora_train"] = {
                "ours_tokens_per_s": round(tokens / o_s, 1),
                "torch_peft_tokens_per_s": round(tokens / t_s, 1),
                "ratio": round(t_s / o_s, 3), "target_ratio": 1.3,
                "ours_step_s": [round(t, 3) for t in times["ours"]],
                "torch_peft_step_s": [round(t, 3) for t in times["torch"]],
                "timing": "steps interleaved ours/torch, median of each",
                "ours_compile_and_first_step_s": round(o_compile, 1),
                "split": train_split(),
                "ours_lm_head_rows": o_rows or TRAIN_B * TRAIN_T,
                "lm_head_note": ("ours computes the lm head and cross-entropy only at the "
                                 "target (answer) positions, gathered into a bucket of "
                                 "ours_lm_head_rows rows; transformers + peft computes the "
                                 "logits at all positions (its loss masks them afterwards), "
                                 "as a plain HF training loop does"),
                "first_loss": {"ours": round(o_loss, 5), "torch_peft": round(t_loss, 5)}}
            flops = training_flops(layers, o_rows)        # the work ours does
            full = training_flops(layers)                 # the work torch + peft does
            achieved = flops["total"] / o_s / 1e9
            result["train_step_flops"] = {
                "gflop_per_step": round(flops["total"] / 1e9, 1),
                "gflop_by_part": {k: round(v / 1e9, 1) for k, v in flops.items() if k != "total"},
                "torch_peft_gflop_per_step": round(full["total"] / 1e9, 1),
                "achieved_gflops": round(achieved, 1),
                "torch_peft_achieved_gflops": round(full["total"] / t_s / 1e9, 1)}
            if "matmul" not in skip:
                mm = bench_matmul(layers, repeats)
                result["train_step_flops"].update({
                    "plain_matmul_gflops": round(mm["gflops"], 1),
                    "plain_matmul_gflops_per_shape": mm["per_shape"],
                    "fraction_of_matmul": round(achieved / mm["gflops"], 3),
                    "target_fraction": 0.7})
        if "generate" not in skip:
            o_run, ours_ids, compile_s = ours_generate(f32)
            t_run, torch_ids = torch_generate(f32)
            times = _interleaved({"ours": o_run, "torch": t_run}, repeats)
            del o_run, t_run
            o_times, t_times = times["ours"], times["torch"]
            o_s, t_s = _median(o_times), _median(t_times)
            same_rows = sum(a == b for a, b in zip(ours_ids, torch_ids))
            same_tok = sum(x == y for a, b in zip(ours_ids, torch_ids) for x, y in zip(a, b))
            first_diff = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
                          for a, b in zip(ours_ids, torch_ids)]
            result["greedy_generate"] = {
                "ours_new_tokens_per_s": round(GEN_B * GEN_N / o_s, 1),
                "transformers_new_tokens_per_s": round(GEN_B * GEN_N / t_s, 1),
                "ratio": round(t_s / o_s, 3), "target_ratio": 2.0,
                "ours_call_s": [round(t, 3) for t in o_times],
                "transformers_call_s": [round(t, 3) for t in t_times],
                "timing": "calls interleaved ours/transformers, median of each",
                "ours_compile_and_first_call_s": round(compile_s, 1),
                "same_sequences_share": round(same_rows / GEN_B, 3),
                "same_tokens_share": round(same_tok / (GEN_B * GEN_N), 4),
                "first_difference_per_row": first_diff}
            if "matmul" not in skip:
                bound = GEN_B * GEN_N / generation_bound_s(layers, repeats)
                result["greedy_generate"].update({
                    "gflop_per_call": round(sum(generation_flops(layers)) / 1e9, 1),
                    "matmul_bound_new_tokens_per_s": round(bound, 1),
                    "matmul_bound_ratio": round(bound * t_s / (GEN_B * GEN_N), 3)})
        if "load" not in skip:
            result["load"] = {"bfloat16_checkpoint": bench_load(bf16),
                              "bfloat16_checkpoint_bfloat16_compute": bench_load(bf16, "bfloat16"),
                              "float32_checkpoint": bench_load(f32)}
    result["wall_s"] = round(time.perf_counter() - wall0, 1)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
