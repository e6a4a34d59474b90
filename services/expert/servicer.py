"""ExpertShard.Exchange: protobuf frames <-> ExpertBatch, nothing else.

Each stream has a reader thread that decodes frames and queues them on the shard; the handler
thread encodes replies as results arrive (any order, each tagged with its sequence). A frame that
fails (bad input, draining, a bug) gets an ExpertReply.error and the stream goes on.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
from typing import Iterator

import grpc
import torch

from moe.v1 import expert_pb2, expert_pb2_grpc
from services.common import tensors
from services.common.errors import InvalidArgument, Unavailable
from services.common.logging import event, get_logger
from services.expert.shard import ExpertShard
from services.wire.batch import FIELD_DTYPES, ExpertBatch
from services.wire.dtypes import REPLY_DTYPES, dispatch_dtype_of, reply_dtype
from services.wire.failures import replica_status

log = get_logger("expert")

SERVICE_NAME = expert_pb2.DESCRIPTOR.services_by_name["ExpertShard"].full_name
_END = object()    # the caller half-closed, or the call ended
_STOP = object()   # the server is stopping: finish in-flight frames, then end the stream


def decode_request(request: expert_pb2.ExpertRequest) -> tuple[ExpertBatch, torch.dtype]:
    """ExpertRequest -> (ExpertBatch, reply dtype); InvalidArgument names the bad field. Each
    tensor is read in one of the dtypes its field may have (services.wire.batch.FIELD_DTYPES);
    the shard validates the rest."""
    for name in ("hidden", "expert_ids", "weights"):
        if not request.HasField(name):
            raise InvalidArgument(f"{name} is missing")
    fields = {name: tensors.decode(getattr(request, name), field=name, allowed=allowed, expect_shape=(None, None))
              for name, allowed in FIELD_DTYPES.items() if request.HasField(name)}
    if request.output_dtype and request.output_dtype not in REPLY_DTYPES:
        raise InvalidArgument(f"output_dtype '{request.output_dtype}' is not one of {', '.join(REPLY_DTYPES)}")
    reply = request.output_dtype or reply_dtype(dispatch_dtype_of(request.hidden.dtype))
    batch = ExpertBatch(int(request.layer), fields["hidden"], fields["expert_ids"], fields["weights"],
                        fields.get("hidden_scales"))
    return batch, tensors.DTYPES[reply]


def error_reply(sequence: int, err: BaseException) -> expert_pb2.ExpertReply:
    code, message = replica_status(err, transport="grpc", sequence=sequence)
    return expert_pb2.ExpertReply(sequence=sequence, error=expert_pb2.ExpertError(code=code.name, message=message))


class ExpertShardServicer(expert_pb2_grpc.ExpertShardServicer):
    def __init__(self, shard: ExpertShard) -> None:
        self.shard = shard
        self._streams: set[queue.SimpleQueue] = set()
        self._lock = threading.Lock()
        self._stopping = False

    def stop_streams(self) -> None:
        """End every open stream once its in-flight frames are answered (shutdown, after the
        shard drained): callers see the stream close and reconnect elsewhere instead of the
        server waiting out its grace period on idle long-lived streams."""
        with self._lock:
            self._stopping = True
            streams = list(self._streams)
        for ready in streams:
            ready.put(_STOP)

    def Exchange(self, request_iterator: Iterator[expert_pb2.ExpertRequest],
                 context: grpc.ServicerContext) -> Iterator[expert_pb2.ExpertReply]:
        ready: queue.SimpleQueue = queue.SimpleQueue()  # (sequence, future | exception) or _END
        context.add_callback(lambda: ready.put(_END))   # caller cancelled or stream ended
        with self._lock:
            if self._stopping:
                raise Unavailable("expert replica is shutting down; use another replica")
            self._streams.add(ready)
        try:
            yield from self._serve(request_iterator, context, ready)
        finally:
            with self._lock:
                self._streams.discard(ready)

    def _serve(self, request_iterator: Iterator[expert_pb2.ExpertRequest], context: grpc.ServicerContext,
               ready: queue.SimpleQueue) -> Iterator[expert_pb2.ExpertReply]:
        reader = threading.Thread(target=self._read, args=(request_iterator, ready),
                                  name="expert-stream-rx", daemon=True)
        reader.start()
        in_flight, reading = 0, True
        while reading or in_flight:
            item = ready.get()
            if item is _END:
                if not context.is_active():
                    return
                reading = False
                continue
            if item is _STOP:
                reading = False  # frames still arriving are dropped; the caller retries them elsewhere
                continue
            if isinstance(item, _Started):
                in_flight += 1
                continue
            sequence, outcome, counted = item
            if counted:
                in_flight -= 1
            if isinstance(outcome, concurrent.futures.Future):
                try:
                    out = outcome.result()
                    reply = expert_pb2.ExpertReply(sequence=sequence)
                    tensors.encode(out, reply.output)
                except Exception as err:  # noqa: BLE001 - reported on the frame
                    reply = error_reply(sequence, err)
            else:
                reply = error_reply(sequence, outcome)
            yield reply

    def _read(self, request_iterator: Iterator[expert_pb2.ExpertRequest], ready: queue.SimpleQueue) -> None:
        """Decode and queue each frame; its result (or error) lands in `ready` when done."""
        try:
            for request in request_iterator:
                sequence = request.sequence
                try:
                    batch, out_dtype = decode_request(request)
                    future = self.shard.submit(batch, out_dtype)
                except Exception as err:  # noqa: BLE001 - reported on the frame
                    ready.put((sequence, err, False))
                    continue
                ready.put(_Started())
                future.add_done_callback(lambda f, s=sequence: ready.put((s, f, True)))
        except grpc.RpcError:
            pass  # the caller went away; the handler notices through the callback
        except Exception as err:  # noqa: BLE001 - a reader bug must still end the stream
            event(log, "expert stream reader failed", level=logging.ERROR, error=str(err), exc_info=True)
        finally:
            ready.put(_END)


class _Started:
    """Marks one more frame in flight (sent before its completion can be)."""
