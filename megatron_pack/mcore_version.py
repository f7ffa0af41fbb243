"""The installed Megatron-Core release, for the errors of the modules that touch its private names."""

from __future__ import annotations


def mcore_version() -> str:
    """``megatron-core``'s version, or "unknown" (a source checkout without metadata)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("megatron-core")
    except PackageNotFoundError:
        return "unknown"
