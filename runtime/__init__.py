"""Torch-free runtime: KV cache, decode loop, backends (issue 4; not built yet)."""
