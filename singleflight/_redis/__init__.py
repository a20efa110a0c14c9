"""Internals of the Redis tier (``singleflight.redis``): scripts, value format, pub/sub, tier."""

__all__ = ()
