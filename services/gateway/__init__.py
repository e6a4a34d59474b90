"""Public gateway: one moe.v1.Inference endpoint that spreads requests over attention workers."""
