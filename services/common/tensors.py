"""Tensor <-> protobuf codec: raw little-endian bytes + dtype name + shape.

Works with any message that has `data` (bytes), `dtype` (string) and `shape` (repeated int64)
fields, so each proto can embed its own tensor message. Encoding costs one copy
(`tensor.numpy().tobytes()`); decoding none (`torch.frombuffer` over the message's bytes, read-only,
so callers that write in place must `.clone()`).

bfloat16 has no numpy dtype; it travels as its raw 16-bit pattern. float8_e4m3fn likewise as bytes.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Iterable

import torch

from services.common.errors import InvalidArgument

# wire name -> torch dtype; the wire name is what `dtype` carries.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
}
NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
# Dtypes numpy cannot hold; encoded through a same-width integer view.
_VIEW_AS = {torch.bfloat16: torch.int16, torch.float8_e4m3fn: torch.uint8}
MAX_ELEMENTS = 1 << 31


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return NAMES[dtype]
    except KeyError:
        raise InvalidArgument(f"tensor dtype {dtype} is not supported on the wire "
                              f"(supported: {', '.join(DTYPES)})") from None


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """Raw bytes of a tensor (one copy; moves to CPU and makes contiguous when needed)."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.dtype in _VIEW_AS:
        t = t.view(_VIEW_AS[t.dtype])
    data = t.numpy().tobytes()
    if sys.byteorder != "little":  # pragma: no cover - every supported host is little-endian
        raise RuntimeError("big-endian hosts are not supported")
    return data


def encode(tensor: torch.Tensor, message: Any) -> Any:
    """Fill `message.data/dtype/shape` from `tensor`; returns the message."""
    message.dtype = dtype_name(tensor.dtype)
    del message.shape[:]
    message.shape.extend(int(d) for d in tensor.shape)
    message.data = tensor_bytes(tensor)
    return message


def decode(message: Any, *, field: str = "tensor", allowed: Iterable[str] | None = None,
           expect_shape: tuple[int | None, ...] | None = None) -> torch.Tensor:
    """A tensor over `message.data` (no copy, read-only); raises InvalidArgument naming `field`.

    `allowed` narrows the accepted dtype names; `expect_shape` checks rank and each non-None size.
    """
    name = message.dtype
    ok = set(DTYPES) if allowed is None else set(allowed)
    if name not in ok or name not in DTYPES:
        raise InvalidArgument(f"{field}: dtype '{name}' is not accepted (expected one of {', '.join(sorted(ok))})")
    dtype = DTYPES[name]
    shape = tuple(int(d) for d in message.shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{field}: negative dimension in shape {list(shape)}")
    count = math.prod(shape)
    if count > MAX_ELEMENTS:
        raise InvalidArgument(f"{field}: shape {list(shape)} has {count} elements, more than {MAX_ELEMENTS}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    data = message.data
    if len(data) != count * itemsize:
        raise InvalidArgument(f"{field}: {len(data)} bytes do not match shape {list(shape)} of {name} "
                              f"({count * itemsize} bytes expected)")
    if expect_shape is not None:
        if len(expect_shape) != len(shape) or any(e is not None and e != d for e, d in zip(expect_shape, shape)):
            want = ["*" if e is None else e for e in expect_shape]
            raise InvalidArgument(f"{field}: shape {list(shape)} does not match expected {want}")
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "buffer is not writable": we never write to it
        flat = torch.frombuffer(data, dtype=_VIEW_AS.get(dtype, dtype))
    if dtype in _VIEW_AS:
        flat = flat.view(dtype)
    return flat.view(shape)
