"""Memory-bounded plain-torch paths: row chunks with the full key axis per chunk, for any device."""
