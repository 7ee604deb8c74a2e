"""Signal specs (``"name[a=1,b=x]"``), the registry of signals and :func:`compute_signals`."""

from __future__ import annotations

import zlib
from typing import Any, Callable, Sequence

import jax

from qbudget.errors import QBudgetError
from qbudget.signals.committee import disagreement_signal, entropy_signal
from qbudget.signals.discriminator import adversary_scores_signal
from qbudget.signals.embeddings import categories_signal, embeddings_signal
from qbudget.signals.losses import HELDOUT_GAIN_LAG, heldout_gain_signal
from qbudget.strategy import SelectionContext

#: Signal name -> accepted parameters with defaults (documented in each function).
SIGNAL_PARAMS: dict[str, dict[str, Any]] = {
    "categories": {},
    "embeddings": {},
    "entropy": {"candidates": 2048, "tokens": 8, "batch_size": 64},
    "disagreement": {"members": 4, "candidates": 256, "tokens": 2, "steps": 4,
                     "batch_size": 8, "learning_rate": 2e-3, "score_batch": 64},
    "adversary_scores": {"candidates": 256, "train_max": 256, "min_train": 8, "l2": 1.0},
    "heldout_gain": {"batch_size": 32},
}

#: Signal name -> ``compute(ctx, key, **params)``.
_COMPUTE: dict[str, Callable[..., Any]] = {
    "categories": categories_signal,
    "embeddings": embeddings_signal,
    "entropy": entropy_signal,
    "disagreement": disagreement_signal,
    "adversary_scores": adversary_scores_signal,
    "heldout_gain": heldout_gain_signal,
}

#: Signal name -> how many rounds back it reads ``ctx.adapter_history`` (absent: none).
_HISTORY_DEPTH: dict[str, int] = {"heldout_gain": HELDOUT_GAIN_LAG}


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"name[a=1,b=x]"`` -> ``("name", {"a": 1, "b": "x"})`` with defaults filled in."""
    spec = spec.strip()
    name, _, rest = spec.partition("[")
    name = name.strip()
    if name not in SIGNAL_PARAMS:
        raise QBudgetError(f"unknown signal '{name}' (known: {', '.join(sorted(SIGNAL_PARAMS))})")
    params = dict(SIGNAL_PARAMS[name])
    if rest:
        if not rest.endswith("]"):
            raise QBudgetError(f"malformed signal spec '{spec}'")
        for item in filter(None, (s.strip() for s in rest[:-1].split(","))):
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or key not in params:
                raise QBudgetError(f"signal '{name}' has no parameter '{key}' "
                                   f"(parameters: {', '.join(params) or 'none'})")
            params[key] = _coerce(value.strip(), params[key], f"{name}.{key}")
    return name, params


def spec(name: str, **params) -> str:
    """Build a spec string (the inverse of :func:`parse_spec`)."""
    if not params:
        return name
    return f"{name}[{','.join(f'{k}={v}' for k, v in params.items())}]"


def _coerce(text: str, default, where: str):
    try:
        if isinstance(default, bool):
            return text.lower() in ("1", "true", "yes")
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
    except ValueError:
        raise QBudgetError(f"signal parameter {where}: expected a number, got '{text}'") from None
    return text


def compute_signals(specs: Sequence[str], ctx: SelectionContext, key) -> dict[str, Any]:
    """Compute exactly the declared signals; returns ``{name: value}``."""
    out: dict[str, Any] = {}
    for s in specs:
        name, params = parse_spec(s)
        if name in out:
            raise QBudgetError(f"signal '{name}' declared twice")
        sub = jax.random.fold_in(key, zlib.crc32(name.encode()))
        out[name] = _COMPUTE[name](ctx, sub, **params)
    return out


def adapter_history_depth(specs: Sequence[str]) -> int:
    """How many rounds of adapter snapshots the declared signals read (0: keep none).

    The loop keeps ``ctx.adapter_history`` for rounds ``round − depth .. round`` (see
    :func:`qbudget.signals.record_adapters`); unknown specs raise like :func:`parse_spec`.
    """
    return max((_HISTORY_DEPTH.get(parse_spec(s)[0], 0) for s in specs), default=0)
