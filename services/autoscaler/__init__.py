"""Autoscaler: per-expert-shard replica decisions from Redis load (README, "Autoscaling expert shards")."""
