"""Gating router: registry of live expert replicas -> versioned placement plan (control plane)."""
