"""Generated protobuf packages of moe-runtime (see protos/moe/v1/*.proto)."""
