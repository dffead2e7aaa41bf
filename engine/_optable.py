"""The built-in operations by kind: an explicit table, not a scan of subclasses.

An engine adds the operations of the workflows it is given
(``Engine(workflows=...)``: each workflow's ``OP``); a store decodes a job's
operation with its table (:class:`engine._store.SqliteStore` ``operations``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

import msgspec

from ._ops import Noop, Operation, RebootInstance, StartInstance, StopInstance, operation_type
from ._ops_migration import EvacuateNode, Failover, Migrate, Reconcile, VerifyCluster
from .errors import InvalidOperation, shorten


def operations_table(classes: Iterable[type[Operation]]) -> dict[str, type[Operation]]:
    """``{kind: class}`` for ``classes``; a kind given twice by different classes is an error."""
    table: dict[str, type[Operation]] = {}
    for cls in classes:
        kind = str(cls.__struct_config__.tag)
        if table.get(kind, cls) is not cls:
            raise TypeError(f"operation kind {kind!r} defined twice ({table[kind].__name__}, {cls.__name__})")
        table[kind] = cls
    return table


#: Every built-in operation class by its kind tag (read-only).
BUILTIN_OPERATIONS: Mapping[str, type[Operation]] = MappingProxyType(
    operations_table((Noop, StartInstance, StopInstance, RebootInstance, Migrate, Failover, EvacuateNode, Reconcile, VerifyCluster))
)


def op_from_dict(data: Mapping[str, Any], operations: Mapping[str, type[Operation]] | None = None) -> Operation:
    """An operation from a mapping with a ``kind`` key (CLI, HTTP).

    ``kind`` names the operation and nothing else: it must be a string, and
    the fields may not carry a second one (the CLI refuses ``kind=`` among
    the fields before it gets here, see :func:`fields_from_pairs`).
    """
    if not isinstance(data, Mapping) or "kind" not in data:
        raise InvalidOperation(f"an operation needs a 'kind' key: {shorten(data)}")
    kind = data["kind"]
    if not isinstance(kind, str):
        raise InvalidOperation(f"an operation's 'kind' must be a string, not {type(kind).__name__} {shorten(kind)}")
    bad_keys = [k for k in data if not isinstance(k, str)]
    if bad_keys:
        raise InvalidOperation(f"{kind}: field names must be strings, not {shorten(bad_keys[0])}")
    cls = operation_type(kind, BUILTIN_OPERATIONS if operations is None else operations)
    for key in data:
        if key != "kind" and key not in cls.__struct_fields__:
            named = f"`{key}`" if len(key) <= 80 else shorten(key)
            raise InvalidOperation(f"{kind}: unknown field {named} (fields: {', '.join(cls.__struct_fields__)})")
    try:
        return msgspec.convert(dict(data), type=cls)
    except msgspec.ValidationError as err:
        raise InvalidOperation(f"{kind}: {err}") from err
