"""Hugging Face checkpoint folders <-> :class:`~qbudget.models.decoder.CausalLM`.

The key mapping is data (each family's table in ``families.py``: HF key template -> path
in our module, whether to transpose), in the spirit of google/tunix loaders. Loading builds
the model abstractly with ``nnx.eval_shape`` (shapes only, no weights), then fills each
leaf from the safetensors files one tensor at a time, chunk by chunk
(``safetensors_stream.py``): float32, float16 or bfloat16 files, weights materialised once.

Supported layouts: a single ``model.safetensors``, or sharded ``*.safetensors`` with a
``model.safetensors.index.json``. ``save_pretrained`` writes ``config.json`` +
``model.safetensors`` that the family's transformers class (``LlamaForCausalLM``,
``MistralForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``) loads directly (LoRA
adapters, if attached, are folded into the saved weights; use
``qbudget.models.lora.save_adapter`` to save them separately).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qbudget.errors import QBudgetError
from qbudget.models.decoder import CausalLM, DecoderSpec
from qbudget.models.families import ALL_KEYS, PLACEHOLDERS, family
from qbudget.models.lora import lora_block, lora_linears
from qbudget.models.safetensors_stream import load_tensor, read_header

#: Every family's HF key <-> module path table together: (HF key template, our path
#: template, transpose); see ``families.py`` for each family's own.
KEY_TABLE: tuple[tuple[str, str, bool], ...] = ALL_KEYS
#: HF keys that carry no weights we need (buffers some exporters write).
_IGNORED = re.compile(r".*rotary_emb\.inv_freq\Z")


def _template_regex(template: str) -> re.Pattern:
    rx = re.escape(template)
    for name, alt in PLACEHOLDERS.items():
        rx = rx.replace(re.escape("{" + name + "}"), f"(?P<{name}>{alt})")
    return re.compile(rx + r"\Z")


def _compile(table):
    return (tuple((_template_regex(hf), ours, tr) for hf, ours, tr in table),
            tuple((_template_regex(ours), hf, tr) for hf, ours, tr in table))


_TABLES: dict[str | None, tuple] = {}


def _tables(model_type: str | None):
    """(forward, backward) compiled regexes of a family's key table (None: all families)."""
    if model_type not in _TABLES:
        _TABLES[model_type] = _compile(KEY_TABLE if model_type is None
                                       else family(model_type).keys)
    return _TABLES[model_type]


def hf_to_path(key: str, model_type: str | None = None) -> tuple[tuple, bool] | None:
    """Our state path (tuple, ints for layer indices) and transpose flag for an HF key
    (in ``model_type``'s table; every family's when None)."""
    for rx, template, transpose in _tables(model_type)[0]:
        m = rx.match(key)
        if m:
            parts = template.format(**m.groupdict()).split(".")
            return tuple(int(p) if p.isdigit() else p for p in parts), transpose
    return None


def path_to_hf(path: tuple, model_type: str | None = None) -> tuple[str, bool] | None:
    """Inverse of :func:`hf_to_path` for base (non-LoRA) parameters."""
    dotted = ".".join(str(p) for p in path)
    for rx, template, transpose in _tables(model_type)[1]:
        m = rx.match(dotted)
        if m:
            return template.format(**m.groupdict()), transpose
    return None


def load_config(path):
    """The transformers config of an HF folder, validated (QBudgetError on anything unsupported)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not path.is_dir():
        raise QBudgetError(f"model folder not found: {path}")
    if not cfg_file.is_file():
        raise QBudgetError(f"no config.json in model folder {path}")
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise QBudgetError(f"malformed {cfg_file}: {e}") from None
    family(raw.get("model_type"), f" in {cfg_file}")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    try:
        DecoderSpec.from_config(config)
    except QBudgetError as e:
        raise QBudgetError(f"{e} (in {cfg_file})") from None
    return config


def _weight_files(path: Path) -> list[Path]:
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise QBudgetError(f"malformed {index}: {e}") from None
        files = sorted({path / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise QBudgetError(f"shard(s) listed in {index} are missing: {', '.join(missing)}")
        return files
    shards = sorted(path.glob("*.safetensors"))
    if shards:
        return shards
    raise QBudgetError(f"no model.safetensors (or sharded *.safetensors + "
                       f"model.safetensors.index.json) in {path}")


def _set(tree: dict, path: tuple, value) -> None:
    for p in path[:-1]:
        tree = tree[p]
    tree[path[-1]] = value


def load_pretrained(path, dtype=jnp.float32) -> CausalLM:
    """Read an HF Llama/Mistral/Qwen2/Qwen3 folder into a :class:`CausalLM`.

    ``dtype`` is the compute dtype of the (frozen) weights: float32, or bfloat16 on an
    accelerator. The files may hold float32, float16 or bfloat16 tensors; each is read
    and converted chunk by chunk into its final array (``safetensors_stream``), so loading
    needs the final weights plus one chunk of memory.
    """
    path = Path(path)
    config = load_config(path)
    files = _weight_files(path)
    abstract = nnx.eval_shape(lambda: CausalLM(config, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    shapes = nnx.to_pure_dict(state)
    expected = {tuple(p): leaf for p, leaf in _flatten(shapes)}
    filled: dict[tuple, jax.Array] = {}
    for f in files:
        entries = read_header(f)
        with open(f, "rb") as fh:
            for entry in entries:
                key = entry.name
                target = hf_to_path(key, config.model_type)
                if target is None:
                    if _IGNORED.match(key):
                        continue
                    raise QBudgetError(f"unexpected tensor {key!r} in {f.name}; not a "
                                       f"{config.model_type} parameter we know")
                p, transpose = target
                if p not in expected:
                    if p[0] == "lm_head" and config.tie_word_embeddings:
                        continue   # tied: some exporters still write lm_head.weight
                    raise QBudgetError(f"unexpected tensor {key!r} in {f.name} for this config")
                want = expected[p]
                shape = entry.shape[::-1] if transpose else entry.shape
                if tuple(shape) != tuple(want.shape):
                    raise QBudgetError(f"shape mismatch for {key!r} in {f.name}: checkpoint has "
                                       f"{tuple(entry.shape)}, config implies "
                                       f"{tuple(want.shape[::-1] if transpose else want.shape)}")
                filled[p] = load_tensor(fh, entry, want.dtype, transpose=transpose)
    missing = [p for p in expected if p not in filled]
    if missing:
        mt = config.model_type
        names = [path_to_hf(p, mt)[0] if path_to_hf(p, mt) else ".".join(map(str, p))
                 for p in missing]
        raise QBudgetError(f"checkpoint {path} lacks {len(missing)} tensor(s), e.g. {names[0]!r}")
    for p, v in filled.items():
        _set(shapes, p, v)
    nnx.replace_by_pure_dict(state, shapes)
    model = nnx.merge(graphdef, state)
    model.generation_eos = generation_eos_ids(path)
    return model


def generation_eos_ids(path: Path) -> tuple[int, ...]:
    """The eos ids of a folder's ``generation_config.json`` (transformers' ``generate``
    stops at these; instruct checkpoints often list more there than in config.json)."""
    f = Path(path) / "generation_config.json"
    if not f.is_file():
        return ()
    try:
        ids = json.loads(f.read_text(encoding="utf-8")).get("eos_token_id")
    except (json.JSONDecodeError, AttributeError) as e:
        raise QBudgetError(f"malformed {f}: {e}") from None
    ids = [] if ids is None else ids if isinstance(ids, list) else [ids]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise QBudgetError(f"malformed {f}: eos_token_id must be an integer or a list of them")
    return tuple(ids)


def _flatten(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, prefix + (k,))
    else:
        yield prefix, tree


def effective_weights(model: CausalLM) -> dict[str, np.ndarray]:
    """HF-named float32/float16 numpy tensors of the model, LoRA folded in."""
    out: dict[str, np.ndarray] = {}
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    # adapted kernels, kernel + scale * A @ B
    merged = {("model", "layers", i, lora_block(t), t, "kernel"): lin.merged_kernel()
              for i, t, lin in lora_linears(model)}
    for p, v in _flatten(state):
        if "lora" in p:
            continue
        hf = path_to_hf(p, model.spec.model_type)
        if hf is None:
            raise RuntimeError(f"no HF name for parameter {p}")
        key, transpose = hf
        arr = np.asarray(merged.get(p, v))
        out[key] = np.ascontiguousarray(arr.T if transpose else arr)
    return out


def save_pretrained(model: CausalLM, path) -> None:
    """Write ``config.json`` + ``model.safetensors`` (HF names, torch layout)."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.config
    config.architectures = [family(config.model_type).architecture]
    config.dtype = model.dtype
    config.save_pretrained(str(path))
    tensors = effective_weights(model)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
