"""Read safetensors files tensor by tensor into JAX arrays, with bounded extra memory.

Why our own reader: ``safetensors``' numpy frontend cannot return bfloat16 (numpy has no
such dtype), which is how most instruct checkpoints ship, and converting through a whole
numpy copy of each tensor (plus the transposed copy our [in, out] kernels need, plus the
device copy) holds two or three extra copies of the largest tensor at once: for a
Qwen2.5-0.5B-shaped student that is the 272 MB embedding, against ~1 GB of weights.

The format is simple (an 8-byte little-endian header length, a JSON header of
``name -> {dtype, shape, data_offsets}``, then raw little-endian bytes), so each tensor
is read in row chunks of at most :data:`CHUNK_BYTES` and each chunk is converted (and
transposed) straight into the destination array. On the CPU backend the destination is
the final JAX buffer itself (written through its host pointer before anything else can
see it), so loading holds the final weights plus one chunk; on an accelerator the
destination is a host array handed to the device once, one tensor at a time.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from qbudget.errors import QBudgetError

#: safetensors dtype codes we read -> numpy dtype (bfloat16 through ml_dtypes, as JAX does).
DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32),
          "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16)}
#: Largest piece of a tensor converted at once (bytes of the source dtype).
CHUNK_BYTES = 16 * 2**20
_MAX_HEADER = 100 * 2**20


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: where its bytes are and how to read them."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int          # absolute byte offset of the first element in the file
    nbytes: int


def read_header(path: Path) -> list[TensorEntry]:
    """The tensors of a safetensors file, in file order (QBudgetError if malformed)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise QBudgetError(f"malformed safetensors file {path.name}: shorter than its header")
        (n,) = struct.unpack("<Q", raw)
        if n > min(_MAX_HEADER, size - 8):
            raise QBudgetError(f"malformed safetensors file {path.name}: header length {n}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise QBudgetError(f"malformed safetensors header in {path.name}: {e}") from None
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            code, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise QBudgetError(f"malformed safetensors header in {path.name}: "
                               f"entry {name!r}") from None
        if code not in DTYPES:
            raise QBudgetError(f"unsupported dtype {code} of tensor {name!r} in {path.name}; "
                               f"supported: {', '.join(DTYPES)}")
        dt = DTYPES[code]
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        if end - start != nbytes or 8 + n + end > size:
            raise QBudgetError(f"malformed safetensors file {path.name}: tensor {name!r} "
                               f"has {end - start} bytes for shape {list(shape)} {code}")
        entries.append(TensorEntry(name, dt, shape, 8 + n + start, nbytes))
    return entries


def _destination(shape: tuple[int, ...], dtype) -> tuple[jax.Array | None, np.ndarray]:
    """(final JAX array or None, writable host view to fill).

    On the CPU backend the view aliases the new JAX buffer: nothing else holds a reference
    to it until we return it, so writing through its host pointer is the same as having
    created it with these values. Elsewhere the view is a plain host array (device_put
    later).
    """
    dtype = np.dtype(dtype)
    if jax.default_backend() == "cpu" and int(np.prod(shape, dtype=np.int64)) > 0:
        out = jnp.zeros(shape, dtype)
        out.block_until_ready()
        buf = (ctypes.c_char * out.nbytes).from_address(out.unsafe_buffer_pointer())
        return out, np.frombuffer(buf, dtype=dtype).reshape(shape)
    return None, np.empty(shape, dtype)


def load_tensor(f, entry: TensorEntry, dtype, transpose: bool = False) -> jax.Array:
    """Read ``entry`` from the open binary file ``f`` as a JAX array of ``dtype``.

    ``transpose`` (2-D only) returns the transposed tensor, as our [in, out] kernels need
    from torch's [out, in] layout. Rows of the source are read :data:`CHUNK_BYTES` at a
    time and written, converted, into the destination.
    """
    shape = entry.shape
    if transpose and len(shape) != 2:
        raise QBudgetError(f"cannot transpose {len(shape)}-D tensor {entry.name!r}")
    out, dest = _destination(shape[::-1] if transpose else shape, dtype)
    rows = shape[0] if shape else 1
    row_bytes = entry.nbytes // max(rows, 1)
    step = max(1, CHUNK_BYTES // max(row_bytes, 1))
    f.seek(entry.offset)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        raw = f.read((r1 - r0) * row_bytes)
        if len(raw) != (r1 - r0) * row_bytes:
            raise QBudgetError(f"truncated safetensors file: tensor {entry.name!r} ends early")
        chunk = np.frombuffer(raw, dtype=entry.dtype.newbyteorder("<"))
        if not shape:
            dest[...] = chunk.reshape(()).astype(dest.dtype)
        elif transpose:
            dest[:, r0:r1] = chunk.reshape((r1 - r0,) + shape[1:]).T
        else:
            dest[r0:r1] = chunk.reshape((r1 - r0,) + shape[1:])
    return out if out is not None else jax.device_put(dest)
