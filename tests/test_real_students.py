"""Real students end to end: instruct chat templates (ChatML, Llama 3 headers, a default
system prompt), several eos ids, and `qbudget run` on a real-world TOML whose student is a
tiny random Qwen3 or Llama-3-style checkpoint (its adapter then loads with PEFT)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from typer.testing import CliRunner

from qbudget.cli import app
from qbudget.models import CausalLM, load_tokenizer
from qbudget.models.generate import generate, generate_text, stop_ids
from qbudget.models.lora import ALL_TARGETS, load_adapter
from qbudget.models.text import encode_prompt, encode_response
from qbudget.pool import save_prompts
from qbudget.results import read_results

pytestmark = pytest.mark.torch_parity

#: Qwen2.5-Instruct's ChatML template (tool branches left out): a default system prompt
#: when the conversation has none.
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a "
    "helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if (message.role == 'user') or (message.role == "
    "'system' and not loop.first) or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
#: Plain ChatML (Qwen3's form without thinking): no system turn unless given.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
#: Llama 3.x Instruct's header form (tools left out): bos, a system header with the
#: knowledge-cutoff lines, then a header per turn, turns closed by <|eot_id|>.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content']|trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}"
    "{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
    "message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")

CHATML_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>"]


def instruct_tokenizer(src, dest: Path, kind: str):
    """The micro world student's tokenizer turned into an instruct tokenizer of ``kind``
    (qwen25 / chatml / llama3): its special tokens added, bos/eos/pad as the real one's."""
    tok = load_tokenizer(src)
    if kind == "llama3":
        tok.add_special_tokens({"additional_special_tokens": LLAMA3_SPECIALS})
        tok.bos_token, tok.eos_token, tok.pad_token = ("<|begin_of_text|>", "<|eot_id|>",
                                                       "<|end_of_text|>")
        tok.chat_template = LLAMA3_TEMPLATE
    else:
        tok.add_special_tokens({"additional_special_tokens": CHATML_SPECIALS})
        tok.bos_token, tok.eos_token, tok.pad_token = None, "<|im_end|>", "<|endoftext|>"
        tok.chat_template = QWEN25_TEMPLATE if kind == "qwen25" else CHATML_TEMPLATE
    tok.save_pretrained(str(dest))
    return load_tokenizer(dest)


@pytest.mark.parametrize("kind,head,system", [
    ("qwen25", "<|im_start|>system\nYou are Qwen", True),
    ("chatml", "<|im_start|>user\n", False),
    ("llama3", "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting", True),
])
def test_instruct_chat_templates_frame_prompts_and_answers(kind, head, system, tmp_path,
                                                           micro_world):
    """The prompt is the template's rendering with the generation prompt, tokenized once
    (no second bos), and the training target closes the turn with the tokenizer's eos."""
    tok = instruct_tokenizer(micro_world.student_dir, tmp_path, kind)
    text = micro_world.pool[0].text
    ids = encode_prompt(tok, text)
    rendered = tok.apply_chat_template([{"role": "user", "content": text}],
                                       add_generation_prompt=True, tokenize=False)
    assert rendered.startswith(head) and ("system" in rendered) == system
    assert ids == tok(rendered, add_special_tokens=False)["input_ids"]
    decoded = tok.decode(ids)
    assert decoded == rendered
    assert decoded.endswith("<|im_start|>assistant\n" if kind != "llama3"
                            else "<|start_header_id|>assistant<|end_header_id|>\n\n")
    if tok.bos_token_id is not None:
        assert ids.count(tok.bos_token_id) == 1
    answer = encode_response(tok, "the answer")
    assert answer[-1] == tok.eos_token_id == tok.convert_tokens_to_ids(
        "<|eot_id|>" if kind == "llama3" else "<|im_end|>")
    assert tok.decode(answer[:-1]) == "the answer"


def _random_student(folder: Path, kind: str, tok, layers: int = 2):
    """A tiny random checkpoint of the family ``kind`` (qwen3 / llama3) for tokenizer ``tok``."""
    from transformers import LlamaConfig, Qwen3Config

    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, rms_norm_eps=1e-6, initializer_range=0.05,
                  pad_token_id=tok.pad_token_id)
    if kind == "qwen3":
        cfg = Qwen3Config(head_dim=32, tie_word_embeddings=True,
                          eos_token_id=tok.eos_token_id, **common)
    else:
        ids = tok.convert_tokens_to_ids(["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"])
        cfg = LlamaConfig(tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                          eos_token_id=ids, rope_theta=500000.0,
                          rope_scaling={"rope_type": "llama3", "factor": 32.0,
                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 64}, **common)
        (folder / "generation_config.json").parent.mkdir(parents=True, exist_ok=True)
    model = CausalLM.from_config(cfg, key=jax.random.key(7))
    model.save_pretrained(folder)
    if kind == "llama3":
        (folder / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": tok.bos_token_id, "eos_token_id": ids, "do_sample": True}))
    return CausalLM.from_pretrained(folder)


def test_generation_stops_at_any_of_several_eos_ids(tmp_path, micro_world):
    """A row stops at whichever listed eos comes first; stop_ids gathers the tokenizer's,
    config.json's and generation_config.json's eos ids."""
    tok = instruct_tokenizer(micro_world.student_dir, tmp_path / "s", "llama3")
    model = _random_student(tmp_path / "s", "llama3", tok)
    eot, end, eom = tok.convert_tokens_to_ids(["<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"])
    assert set(stop_ids(model, tok)) == {eot, end, eom} and stop_ids(model, tok)[0] == eot
    assert model.generation_eos == (end, eom, eot)
    prompt = [encode_prompt(tok, micro_world.pool[i].text) for i in range(3)]
    free = generate(model, prompt, max_new_tokens=12, eos_token_id=[])
    for row in free:
        assert len(row) == 12
    # the third token each row generates, listed second among the stops, ends that row
    stops = [-5] + sorted({row[2] for row in free})
    cut = generate(model, prompt, max_new_tokens=12, eos_token_id=stops)
    for row, full in zip(cut, free):
        first = min(k for k, t in enumerate(full) if t in stops)
        assert row == full[:first] and first <= 2


RUN = """
world = "{world}"
seed = 0
[strategy]
name = "stratified"
[budget]
total = 24
round_size = 12
checkpoints = [24]
[distill]
steps_per_round = 3
batch_size = 8
learning_rate = 3e-3
[eval]
adversaries = ["ngram"]
ceiling = false
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["qwen3", "llama3"])
def test_qbudget_run_distills_a_real_family_student(kind, tmp_path, micro_world):
    """`qbudget run` on a real-world TOML whose student is a tiny random Qwen3 (ChatML) or
    Llama-3-style checkpoint (llama3 rope, three eos ids, Llama 3 headers): the run
    completes, its answers are framed by the student's template, and the adapter it
    writes (all seven projections) loads with PEFT on transformers' model with our logits."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    student_dir = tmp_path / "student"
    tok = instruct_tokenizer(micro_world.student_dir, student_dir,
                             "chatml" if kind == "qwen3" else "llama3")
    base = _random_student(student_dir, kind, tok)
    save_prompts(micro_world.pool[:120], tmp_path / "pool.jsonl")
    save_prompts(micro_world.probe[:60], tmp_path / "probe.jsonl")
    world = tmp_path / "world.toml"
    world.write_text(f'name = "{kind}-student"\nstudent = "{student_dir}"\npool = "pool.jsonl"\n'
                     'probe = "probe.jsonl"\nseed = 5\n'
                     "[sampling]\ntemperature = 0.8\ntop_p = 0.95\nmax_new_tokens = 16\n"
                     f'[teacher]\nkind = "local"\ndir = "{micro_world.teacher_dir}"\n')
    cfg = tmp_path / "run.toml"
    cfg.write_text(RUN.format(world=world))
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["run", "--config", str(cfg), "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    df = read_results(out)
    assert set(df.q) == {0, 24} and set(df.world) == {f"{kind}-student"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "done"

    adapter = out / "adapter"
    acfg = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(acfg["target_modules"]) == sorted(ALL_TARGETS)
    ours = load_adapter(CausalLM.from_pretrained(student_dir), adapter)
    texts = [p.text for p in micro_world.probe[:3]]
    ids = [encode_prompt(tok, t) + encode_response(tok, "an answer") for t in texts]
    width = max(map(len, ids))
    batch = np.array([[tok.pad_token_id] * (width - len(r)) + r for r in ids])
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in ids])
    mine = np.asarray(ours(batch, mask))
    from transformers import AutoModelForCausalLM

    tm = AutoModelForCausalLM.from_pretrained(str(student_dir), attn_implementation="eager")
    pm = peft.PeftModel.from_pretrained(tm, str(adapter)).eval()
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        ref = pm(torch.tensor(batch), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(pos)).logits.numpy()
    real = mask.astype(bool)
    assert float(np.abs(mine - ref)[real].max()) <= 1e-4
    assert float(np.abs(mine - np.asarray(base(batch, mask)))[real].max()) > 1e-3
    # the distilled student answers through its own template and stops at its eos ids
    answers = generate_text(ours, tok, texts, max_new_tokens=8)
    assert all(isinstance(a, str) and "<|" not in a for a in answers)
