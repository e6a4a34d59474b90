"""Deployment sizing behind `moe size`: decode-step time, throughput and memory of a deployment.

`estimate.size_deployment(cfg, profile, deployment)` is the importable entry; `profiles` holds hardware
figures, `load` turns an expert-load distribution into the slowest device's share, `values`
reads a Helm values file into a `Deployment`.
"""
