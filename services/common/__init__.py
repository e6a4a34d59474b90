"""Pieces every service shares: settings, logging, errors -> status codes, server bootstrap,
Redis registry/plan/load and the one loop that polls Redis, a tensor codec and loopback helpers."""
