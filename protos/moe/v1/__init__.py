"""moe.v1 protocol: inference, router and expert services (generated code; run scripts/gen-protos.sh)."""
