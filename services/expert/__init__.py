"""Expert-shard service: hosts a set of (layer, expert) weights and computes routed-expert work
sent by attention workers, merging what arrives for one layer into one batched computation."""
