"""The expert wire's contract: what an attention worker and an expert shard agree on, whichever
transport carries the bytes.

    dtypes.py    dispatch dtypes, the reply-dtype rule, bytes per token (no torch: deployment sizing reads it)
    codec.py     hidden states on the wire: FP8 1x128 encode/decode, a batch's wire tensors
    batch.py     ExpertBatch, the dtypes each field may have, validation against a shard's holdings
    failures.py  failures -> (status, message) on the replica, and back to exceptions at the caller

services/transport/ moves these bytes (gRPC, UCX); services/expert/ computes what they carry.
"""
