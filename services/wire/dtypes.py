"""Dispatch dtypes, the reply-dtype rule and the bytes one token puts on the wire.

Hidden states travel in the dispatch dtype ("fp32", "bf16", or "fp8": float8_e4m3fn with one
float32 scale per 128 channels); every (token, top-k slot) adds an int32 expert id and a float32
weight; the reply is float32 in fp32 mode and bfloat16 otherwise (combine is never FP8).

    reply_dtype("fp8")                                  # "bfloat16"
    dispatch_bytes_per_token(7168, topk=8, dispatch_dtype="fp8")   # one token to one replica
    combine_bytes_per_token(7168, "fp8")                # its reply

No torch here: deployment sizing (services/sizing) reads it without loading torch. Dtypes are named as the
wire names them (services/common/tensors.py maps the names to torch dtypes).
"""

from __future__ import annotations

import math

DISPATCH_DTYPES = ("fp32", "bf16", "fp8")
# dispatch dtype -> the dtype hidden states have on the wire, and its bytes per value
HIDDEN_WIRE_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp8": "float8_e4m3fn"}
WIRE_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float8_e4m3fn": 1}
VALUE_BYTES = {name: WIRE_DTYPE_BYTES[wire] for name, wire in HIDDEN_WIRE_DTYPES.items()}
REPLY_DTYPES = ("float32", "bfloat16")   # what `reply_dtype` gives, and a request may ask for
FP8_GROUP = 128                   # channels per fp8 scale ("1x128" blocks)
FP8_SCALE_BYTES = 4               # one float32 per group
ROUTING_BYTES_PER_SLOT = 4 + 4    # int32 expert id + float32 weight, per (token, top-k slot)


def check_dispatch_dtype(dispatch_dtype: str) -> str:
    if dispatch_dtype not in DISPATCH_DTYPES:
        raise ValueError(f"dispatch dtype '{dispatch_dtype}' is not one of {', '.join(DISPATCH_DTYPES)}")
    return dispatch_dtype


def dispatch_dtype_of(hidden_wire_dtype: str) -> str:
    """The dispatch dtype whose hidden states have this wire dtype ("float32" -> "fp32")."""
    for dispatch_dtype, wire_dtype in HIDDEN_WIRE_DTYPES.items():
        if wire_dtype == hidden_wire_dtype:
            return dispatch_dtype
    raise ValueError(f"hidden dtype '{hidden_wire_dtype}' is not one of {', '.join(HIDDEN_WIRE_DTYPES.values())}")


def reply_dtype(dispatch_dtype: str) -> str:
    """The wire dtype of a shard's reply: "float32" in fp32 mode, else "bfloat16"."""
    return "float32" if check_dispatch_dtype(dispatch_dtype) == "fp32" else "bfloat16"


def scale_groups(hidden_size: int) -> int:
    """Number of 128-channel scale groups for a hidden size (the last may be partial)."""
    return math.ceil(hidden_size / FP8_GROUP)


def hidden_bytes_per_token(hidden_size: int, dispatch_dtype: str, with_scales: bool = True) -> int:
    """Bytes of one token's activations on the wire (fp8: with its scales unless with_scales is False)."""
    values = hidden_size * VALUE_BYTES[check_dispatch_dtype(dispatch_dtype)]
    if dispatch_dtype == "fp8" and with_scales:
        return values + FP8_SCALE_BYTES * scale_groups(hidden_size)
    return values


def dispatch_bytes_per_token(hidden_size: int, topk: int, dispatch_dtype: str) -> int:
    """Bytes one token adds to one replica's request: activations + its top-k ids and weights."""
    return hidden_bytes_per_token(hidden_size, dispatch_dtype) + topk * ROUTING_BYTES_PER_SLOT


def combine_bytes_per_token(hidden_size: int, dispatch_dtype: str) -> int:
    """Bytes of one token's reply (its dtype by `reply_dtype`)."""
    return hidden_size * WIRE_DTYPE_BYTES[reply_dtype(dispatch_dtype)]
