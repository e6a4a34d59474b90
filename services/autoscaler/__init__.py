"""Autoscaler: per-expert-shard replica decisions from Redis load (docs/autoscaling.md)."""
