"""The decorator's keys: a call's arguments as a key, and the arguments that defeat one."""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

__all__ = ("by_identity", "unhashable_error")


def unhashable_error(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> TypeError:
    """Name the first argument that cannot be part of a key."""
    where = "an argument"
    for i, a in enumerate(args):
        try:
            hash(a)
        except TypeError:
            where = f"positional argument {i} ({type(a).__name__} {a!r:.60})"
            break
    else:
        for name, a in kwargs.items():
            try:
                hash(a)
            except TypeError:
                where = f"argument {name}= ({type(a).__name__} {a!r:.60})"
                break
    return TypeError(
        f"@singleflight {fn.__qualname__}: {where} is not hashable, so it cannot be part of the "
        "key; pass key=lambda *args, **kwargs: ... returning something hashable "
        "(e.g. a tuple or a str) that identifies the call"
    )


#: Types hashed by identity on purpose: equal means "the same thing" for them.
_IDENTITY_OK = (type, types.FunctionType, types.BuiltinFunctionType, types.ModuleType)


def by_identity(value: object) -> bool:
    """Does ``value`` hash by identity, so that equal-looking calls never share a key?"""
    cls = type(value)
    return (
        cls.__hash__ is object.__hash__
        and cls.__eq__ is object.__eq__
        and cls is not object  # a sentinel
        and not isinstance(value, _IDENTITY_OK)
    )
