"""Wire format of the UCX expert path: one head message, then zero or more tail messages.

Every request and reply starts with a *head* message: a fixed 48-byte header followed by as
many leading sections as fit in the link's inline limit (each 8-byte aligned; INLINE_LIMIT on
TCP-only hosts, DEVICE_INLINE_LIMIT where UCX moves GPU memory or uses RDMA). Sections that do
not fit follow as one tag message each, sent straight from the tensor's memory and received
straight into a preallocated tensor. Both sides derive the split from the header alone. A
head's length varies with its inline sections: the listener learns it from a tag probe (and
receives exactly that many bytes); the requester knows the reply's shape and posts a receive
of `reply_head_size` bytes for it.

Tags (64 bits): link << 32 | direction << 31 | part << 24 | sequence mod 2^24. `link` is a random
id the connecting side picks per endpoint and sends first over UCX's stream API, with the link's
inline limit (the hello: two little-endian u64); UCX matches tags per worker, not per endpoint,
so the link keeps one listener's endpoints (and a client and a listener sharing a process)
apart. Part 0 is the head, part i the i-th tail. The listener probes for request heads with HEAD_MASK (any link, any sequence) and
finds the peer by the link; every other message has its own exact tag, so frames sent
concurrently from several threads may interleave on the wire, and a requester posts the receives
for a reply before the reply exists.

    request sections: expert_ids int32 [T, K], weights float32 [T, K],
                      scales float32 [T, ceil(H/128)] (fp8 only), hidden wire dtype [T, H]
    reply sections:   output reply dtype [T, H]          (status OK)
                      UTF-8 error text, inline only        (status INVALID / UNAVAILABLE / ERROR)

The status byte carries the contract's status (services/wire/failures.py): INVALID for
INVALID_ARGUMENT, ERROR for INTERNAL, UNAVAILABLE for every other one.

A decode batch up to the inline limit is therefore one message each way (the sender copies its
sections into the head; every message goes eager over TCP, see ucx_runtime); a larger one is a
head + zero-copy tails.
Header (little-endian): magic u32, kind u8, status u8, wire dtype u8, reply dtype u8,
sequence u64, layer i32, tokens i32, hidden i32, topk i32, text bytes u32, 12 reserved bytes.
"""

from __future__ import annotations

import ctypes
import math
import struct
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from services.wire.dtypes import scale_groups

MAGIC = 0x3145_4F4D                    # b"MOE1" little-endian
HEADER = struct.Struct("<IBBBBQiiiiI12x")
ALIGN = 8
# Sections inline in the head, in bytes. A tail costs a send, a receive and often a wake-up more
# than copying 64 KiB into the head (loopback TCP, 2 cores: 16 and 64 KiB round trips 10 to 25%
# faster as one message; 128 KiB no slower). Above it the tail spares copying the hidden states.
INLINE_LIMIT = (256 << 10) - HEADER.size
# Where UCX moves GPU memory or uses RDMA, a tail goes zero-copy (cuda_ipc, GPUDirect) while an
# inline section of a GPU tensor costs a D2H copy: there only the small sections ride in the head.
# The connecting side picks the limit of a link for both directions and names it in its hello.
DEVICE_INLINE_LIMIT = 8192 - HEADER.size
ERROR_TEXT_LIMIT = 2048                # bytes of an error reply's text

KIND_REQUEST, KIND_REPLY = 1, 2
SEQUENCE_BITS = 24
HEAD_MASK = ((1 << 32) - 1) ^ ((1 << SEQUENCE_BITS) - 1)   # direction and part 0; any link, any sequence
STATUS_OK, STATUS_INVALID, STATUS_UNAVAILABLE, STATUS_ERROR = 0, 1, 2, 3
# status byte <-> grpc.StatusCode name of an error reply
STATUS_NAMES = {STATUS_INVALID: "INVALID_ARGUMENT", STATUS_UNAVAILABLE: "UNAVAILABLE", STATUS_ERROR: "INTERNAL"}
_STATUS_BYTES = {"INVALID_ARGUMENT": STATUS_INVALID, "INTERNAL": STATUS_ERROR}
DTYPE_CODES = {torch.float32: 1, torch.bfloat16: 2, torch.float8_e4m3fn: 3}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
# Head messages are packed and unpacked through numpy: a decode step frames thousands of them, and
# every torch call on a tiny tensor costs microseconds. bf16/fp8 have no numpy type and go as bytes.
NUMPY_DTYPES = {torch.float32: np.float32, torch.int32: np.int32}


class FrameError(ValueError):
    """A head message that is not ours or is inconsistent (a peer bug or a stray sender)."""


class Header(NamedTuple):
    kind: int
    status: int
    wire_dtype: torch.dtype | None    # hidden (request) or output (reply) dtype; None for errors
    reply_dtype: torch.dtype | None   # what the requester wants back; None in replies
    sequence: int
    layer: int
    tokens: int
    hidden: int
    topk: int
    text_bytes: int = 0


class Section(NamedTuple):
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class Frame:
    """What goes on the wire: `head` (uint8, host memory) then each of `tails` (uint8 views)."""

    head: np.ndarray
    tails: list[torch.Tensor]

    @property
    def nbytes(self) -> int:
        return self.head.nbytes + sum(t.numel() for t in self.tails)


def byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's memory as a flat uint8 tensor (no copy when already contiguous)."""
    return tensor.contiguous().view(-1).view(torch.uint8)


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def inline_count(sections: list[Section], limit: int = INLINE_LIMIT) -> int:
    """How many leading sections travel inside the head message."""
    return len(_inline_offsets([section.nbytes for section in sections], HEADER.size, HEADER.size + limit))


def _inline_offsets(sizes: list[int], start: int, end: int) -> list[int]:
    """Offsets in the head of the leading sections of `sizes` bytes that fit before `end`."""
    offsets = []
    for size in sizes:
        start = _aligned(start)
        if start + size > end:
            break
        offsets.append(start)
        start += size
    return offsets


def request_sections(header: Header) -> list[Section]:
    tokens, topk, hidden = header.tokens, header.topk, header.hidden
    sections = [Section((tokens, topk), torch.int32), Section((tokens, topk), torch.float32)]
    if header.wire_dtype == torch.float8_e4m3fn:
        sections.append(Section((tokens, scale_groups(hidden)), torch.float32))
    sections.append(Section((tokens, hidden), header.wire_dtype))
    return sections


def reply_sections(header: Header) -> list[Section]:
    if header.status != STATUS_OK:
        return []
    return [Section((header.tokens, header.hidden), header.wire_dtype)]


def _host(head: torch.Tensor | np.ndarray) -> np.ndarray:
    return head if isinstance(head, np.ndarray) else head.numpy()


def _copy_into(head: np.ndarray, address: int, offset: int, size: int, tensor: torch.Tensor) -> None:
    """Copy `tensor` into `head` (whose memory starts at `address`) at `offset`: one memmove for a
    contiguous host tensor (a torch or numpy copy costs several microseconds more on tiny tensors),
    a D2H copy for a GPU tensor."""
    if tensor.is_cuda:
        torch.from_numpy(head[offset:offset + size]).copy_(byte_view(tensor))
    else:
        source = tensor.contiguous()
        ctypes.memmove(address + offset, source.data_ptr(), size)


def _pack(header: Header, tensors: list[torch.Tensor], text: bytes = b"", limit: int = INLINE_LIMIT) -> Frame:
    sizes = [t.nbytes for t in tensors]
    offsets = _inline_offsets(sizes, HEADER.size + len(text), HEADER.size + limit)
    n_inline = len(offsets)
    head = np.empty(offsets[-1] + sizes[n_inline - 1] if offsets else HEADER.size + len(text), dtype=np.uint8)
    HEADER.pack_into(head, 0, MAGIC, header.kind, header.status,
                     DTYPE_CODES.get(header.wire_dtype, 0), DTYPE_CODES.get(header.reply_dtype, 0),
                     header.sequence, header.layer, header.tokens, header.hidden, header.topk, len(text))
    if text:
        head[HEADER.size:HEADER.size + len(text)] = np.frombuffer(text, dtype=np.uint8)
    if offsets:
        address = head.ctypes.data
        for offset, size, tensor in zip(offsets, sizes, tensors):
            _copy_into(head, address, offset, size, tensor)
    tails = [byte_view(t) for t in tensors[n_inline:]]
    cuda_tail = next((t for t in tails if t.is_cuda), None)
    if cuda_tail is not None:
        # UCX reads GPU memory on streams of its own, unordered with torch's: the kernels that
        # write a tail (a gather, a dtype conversion, the expert compute) must have finished
        torch.cuda.current_stream(cuda_tail.device).synchronize()
    return Frame(head, tails)


def encode_request(sequence: int, layer: int, expert_ids: torch.Tensor, weights: torch.Tensor,
                   hidden: torch.Tensor, scales: torch.Tensor | None, reply_dtype: torch.dtype,
                   limit: int = INLINE_LIMIT) -> Frame:
    """Request frame; `hidden` already in its wire dtype (with `scales` iff float8); `limit`: the
    link's inline limit."""
    if hidden.dim() != 2 or expert_ids.dim() != 2 or expert_ids.shape != weights.shape \
            or expert_ids.shape[0] != hidden.shape[0]:
        raise ValueError(f"request shapes disagree: hidden {list(hidden.shape)}, expert_ids "
                         f"{list(expert_ids.shape)}, weights {list(weights.shape)} (want [T, H], [T, K], [T, K])")
    if hidden.dtype not in DTYPE_CODES:
        raise ValueError(f"hidden dtype {hidden.dtype} cannot go on the UCX wire ({list(DTYPE_CODES)})")
    if (scales is not None) != (hidden.dtype == torch.float8_e4m3fn):
        raise ValueError("fp8 scales must accompany float8_e4m3fn hidden states, and only them")
    tokens, hidden_size = hidden.shape
    header = Header(KIND_REQUEST, STATUS_OK, hidden.dtype, reply_dtype, sequence, layer,
                    tokens, hidden_size, int(expert_ids.shape[1]))
    tensors = [_as(expert_ids, torch.int32), _as(weights, torch.float32)]
    if scales is not None:
        tensors.append(_as(scales, torch.float32))
    tensors.append(hidden)
    return _pack(header, tensors, limit=limit)


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def encode_reply(sequence: int, output: torch.Tensor, limit: int = INLINE_LIMIT) -> Frame:
    tokens, hidden_size = output.shape
    return _pack(Header(KIND_REPLY, STATUS_OK, output.dtype, None, sequence, 0, tokens, hidden_size, 0), [output],
                 limit=limit)


def status_byte(status: str) -> int:
    """The status byte of an error reply with this grpc.StatusCode name."""
    return _STATUS_BYTES.get(status, STATUS_UNAVAILABLE)


def encode_error(sequence: int, status: int, message: str) -> Frame:
    text = message.encode("utf-8", "replace")[:ERROR_TEXT_LIMIT]
    return _pack(Header(KIND_REPLY, status, None, None, sequence, 0, 0, 0, 0), [], text)


def tag(link: int, kind: int, part: int, sequence: int) -> int:
    """The UCX tag of part `part` (0: head) of the frame `sequence` of `kind` on link `link`."""
    return link << 32 | (kind == KIND_REPLY) << 31 | part << SEQUENCE_BITS | sequence % (1 << SEQUENCE_BITS)


def link_of(tag: int) -> int:
    """The link a message's tag names (see Tags above)."""
    return tag >> 32


def reply_head_size(shape: tuple[int, int], dtype: torch.dtype, limit: int = INLINE_LIMIT) -> int:
    """Bytes to receive a reply's head into: its output inline when that fits, or an error."""
    output = Section(shape, dtype).nbytes
    inline = _inline_offsets([output], HEADER.size, HEADER.size + limit)
    return max(inline[0] + output if inline else HEADER.size, HEADER.size + ERROR_TEXT_LIMIT)


def parse_header(head: torch.Tensor | np.ndarray, kind: int) -> Header:
    """Header of a received head message (`head` is the uint8 receive buffer)."""
    (magic, got_kind, status, wire_code, reply_code, sequence, layer, tokens, hidden, topk,
     text_bytes) = HEADER.unpack_from(_host(head), 0)
    if magic != MAGIC or got_kind != kind:
        raise FrameError(f"not a moe.v1 UCX {'request' if kind == KIND_REQUEST else 'reply'} frame "
                         f"(magic {magic:#x}, kind {got_kind})")
    if min(tokens, hidden, topk) < 0 or text_bytes > ERROR_TEXT_LIMIT:
        raise FrameError(f"frame header out of range: tokens {tokens}, hidden {hidden}, topk {topk}, "
                         f"text {text_bytes} bytes")
    if kind == KIND_REPLY and status == STATUS_OK or kind == KIND_REQUEST:
        if wire_code not in CODE_DTYPES:
            raise FrameError(f"unknown wire dtype code {wire_code}")
    if kind == KIND_REQUEST and reply_code not in CODE_DTYPES:
        raise FrameError(f"unknown reply dtype code {reply_code}")
    return Header(got_kind, status, CODE_DTYPES.get(wire_code), CODE_DTYPES.get(reply_code), sequence,
                  layer, tokens, hidden, topk, text_bytes)


def error_text(head: torch.Tensor | np.ndarray, header: Header) -> str:
    return bytes(_host(head)[HEADER.size:HEADER.size + header.text_bytes]).decode("utf-8", "replace")


def split_inline(head: torch.Tensor | np.ndarray, header: Header, sections: list[Section],
                 limit: int = INLINE_LIMIT) -> tuple[list[torch.Tensor], list[Section]]:
    """(views of the inline sections inside `head`, the sections still to receive as tails)."""
    sizes = [section.nbytes for section in sections]
    offsets = _inline_offsets(sizes, HEADER.size + header.text_bytes, HEADER.size + limit)
    buffer = _host(head)
    views = []
    for offset, size, (shape, dtype) in zip(offsets, sizes, sections):
        raw = buffer[offset:offset + size]
        if dtype in NUMPY_DTYPES:
            views.append(torch.from_numpy(raw.view(NUMPY_DTYPES[dtype]).reshape(shape)))
        else:
            views.append(torch.from_numpy(raw.reshape(*shape[:-1], shape[-1] * dtype.itemsize)).view(dtype))
    return views, sections[len(offsets):]
