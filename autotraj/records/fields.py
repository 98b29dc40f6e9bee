"""Field checkers for `from_dict`: each raises `RecordError` naming the record and the field.

`where` is how the record names itself in the message ("trajectory q1/s0", "repair of q1/s1").
Every record schema (records/) parses with these; other modules use them too (report/), so
they are public.

Not here: the records themselves.
"""

from __future__ import annotations

from typing import Any, get_args


class RecordError(ValueError):
    """A record (or a field of one) is malformed."""


def require(data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """`data[key]`, checked to be of `kind` (a bool is never taken for an int)."""
    if not isinstance(data, dict):
        raise RecordError(f"{where}: expected an object, got {type(data).__name__}")
    if key not in data:
        raise RecordError(f"{where}: missing field '{key}'")
    value = data[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in kinds):
        raise RecordError(
            f"{where}: field '{key}' must be {kind_name(kind)}, got {type(value).__name__}"
        )
    return value


def kind_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return " or ".join(k.__name__ for k in kind)
    return kind.__name__


def optional(data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """An optional field: None when absent or null, else checked like `require`."""
    if isinstance(data, dict) and data.get(key) is None:
        return None
    return require(data, key, kind, where)


def numbers(data: dict[str, Any], key: str, kind: type, where: str) -> tuple[Any, ...] | None:
    """An optional list of ints (kind=int) or of numbers (kind=float), as a tuple."""
    values = optional(data, key, list, where)
    if values is None:
        return None
    kinds = (int, float) if kind is float else (int,)
    if not all(isinstance(v, kinds) and not isinstance(v, bool) for v in values):
        raise RecordError(f"{where}: field '{key}' must be a list of {kind.__name__}s")
    return tuple(values) if kind is int else tuple(float(v) for v in values)


def literal(value: Any, literal: Any, key: str, where: str) -> Any:
    """`value` if it is one of the `Literal` type's strings, else a RecordError naming `key`."""
    allowed = get_args(literal)
    if value not in allowed:
        raise RecordError(f"{where}: field '{key}' must be one of {allowed}, got {value!r}")
    return value
