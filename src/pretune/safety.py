"""Nothing unsafe is loaded: safetensors checked before reading, pickles refused, paths contained.

A pickle is a program: unpickling it (pickle's `load`, or torch's `load` without
`weights_only=True`) calls whatever `__reduce__` names, so a checkpoint from
the wrong place can run code on load. pretune stores weights as safetensors
and state as JSON, and never unpickles. A folder pretune would load from that
holds a pickle is refused before anything in it is opened for loading.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
(dtype, shape, data_offsets per tensor), then the raw data. A corrupted or
hostile N (say 2**63) would make a naive reader allocate that much memory, so
`check_safetensors` reads the 8 bytes and compares N with the file size and a
cap before reading the header, then checks every tensor's dtype, its offsets and
byte count against the file, and that no two tensors share bytes, before any
tensor is read.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .errors import PretuneError

# safetensors' own reader refuses headers over 100 MB (MAX_HEADER_SIZE in the Rust crate)
MAX_HEADER_BYTES = 100_000_000

DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8,
               "F8_E8M0": 1}

PICKLE_SUFFIXES = {".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib"}


def check_safetensors(path: str | Path, max_header: int = MAX_HEADER_BYTES) -> dict:
    """The header of a safetensors file, after checking it fits the file; PretuneError otherwise.

    Nothing larger than the header (at most `max_header` bytes, and never more
    than the file holds) is read or allocated here."""
    path = Path(path)
    bad = lambda what: PretuneError(f"not a valid safetensors file: {what}", str(path),  # noqa: E731
                                    "the file is damaged or not safetensors; restore or re-create it")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad(f"{size} bytes, shorter than the 8-byte header length")
            n = int.from_bytes(head, "little")
            if n > max_header or n > size - 8:
                raise bad(f"header length {n:,} bytes, but the file has {size:,} bytes"
                          + (f" and the cap is {max_header:,}" if n > max_header else ""))
            raw = f.read(n)
    except OSError as e:
        raise PretuneError(f"cannot read {path.name}: {e.strerror}", str(path), "check the path and permissions")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise bad("the header is not JSON") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    data = size - 8 - n
    spans = []
    for name, t in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(t, dict) or t.get("dtype") not in DTYPE_BYTES:
            raise bad(f"tensor '{name}' has no known dtype")
        shape, off = t.get("shape"), t.get("data_offsets")
        if (not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape)
                or not isinstance(off, list) or len(off) != 2 or not all(isinstance(o, int) for o in off)):
            raise bad(f"tensor '{name}' has a malformed shape or data_offsets")
        a, b = off
        if not 0 <= a <= b <= data:
            raise bad(f"tensor '{name}' lies at bytes {a:,}..{b:,}, past the {data:,} data bytes of the file")
        if b - a != math.prod(shape) * DTYPE_BYTES[t["dtype"]]:
            raise bad(f"tensor '{name}' of shape {shape} {t['dtype']} does not fill its {b - a:,} bytes")
        if b > a:  # an empty tensor shares no bytes
            spans.append((a, b, name))
    spans.sort()
    for (a, b, x), (c, d, y) in zip(spans, spans[1:]):
        if c < b:  # two tensors sharing bytes: a crafted file, or a damaged header
            raise bad(f"tensors '{x}' (bytes {a:,}..{b:,}) and '{y}' (bytes {c:,}..{d:,}) overlap")
    return header


def load_safetensors(path: str | Path, device: str = "cpu") -> dict:
    """`safetensors.torch.load_file`, after `check_safetensors`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_safetensors(path)
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise PretuneError(f"cannot read {Path(path).name}: {e}", str(path), "the file is damaged") from e


def looks_like_pickle(path: str | Path) -> bool:
    """A pickle by its name or its first bytes: protocol 2+ starts with 0x80 and the protocol
    number; `torch.save` writes a zip archive holding data.pkl (it starts with 'PK')."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5) or head[:4] == b"PK\x03\x04"


def refuse_pickles(folder: str | Path) -> None:
    """PretuneError if `folder` (or a folder below it) holds a pickle: it is never opened for loading."""
    folder = Path(folder)
    for root, _dirs, files in os.walk(folder):
        for name in sorted(files):
            p = Path(root) / name
            if looks_like_pickle(p):
                raise PretuneError(f"{p.relative_to(folder)} is a pickle, which can run code when loaded; "
                                   "pretune never unpickles", str(folder),
                                   "delete that file (pretune writes only safetensors and JSON), "
                                   "or convert trusted weights to safetensors yourself")


def contained(path: str | Path, root: str | Path) -> bool:
    """True if `path`, with links followed, lies inside `root` (also with links followed)."""
    try:
        Path(path).resolve().relative_to(Path(root).resolve())
        return True
    except ValueError:
        return False
