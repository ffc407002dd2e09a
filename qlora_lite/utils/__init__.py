"""Plumbing every layer uses: atomic writes, safe readers, byte units, dtype names, host-memory settings."""
