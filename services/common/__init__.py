"""Pieces every service shares: settings, logging, errors -> status codes, server bootstrap,
Redis registry/plan/load, a tensor codec and loopback helpers."""
