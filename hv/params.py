"""Hypervisor parameter checks (the seed's ``_CHECK`` tuples) and CPU masks.

A check is a 5-tuple ``(required, syntax_fn, syntax_msg, validity_fn,
validity_msg)``. Syntax checks run where a job is submitted and touch nothing
outside the process; validity checks run on the node (files exist, …).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

from .errors import ParameterError, ParseError

#: The value a multi CPU mask uses for "all CPUs".
CPU_ALL = -1

MIGRATION_MODE_LIVE = "live"
MIGRATION_MODE_NON_LIVE = "non-live"
MIGRATION_MODES = (MIGRATION_MODE_LIVE, MIGRATION_MODE_NON_LIVE)


class Check(NamedTuple):
    required: bool
    syntax_fn: Callable[[Any], bool] | None
    syntax_msg: str | None
    validity_fn: Callable[[Any], bool] | None
    validity_msg: str | None


# --- CPU masks ---------------------------------------------------------------

_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_cpu_mask(mask: str) -> list[int]:
    """Parse ``"0-2,5"`` into ``[0, 1, 2, 5]``; ``""`` is ``[]``.

    Raises :class:`ParseError` for reversed ranges, negatives and junk.
    """
    if not isinstance(mask, str):
        raise ParseError(f"CPU mask must be a string, not {type(mask).__name__}: {mask!r}")
    if not mask.strip():
        return []
    cpus: list[int] = []
    for part in mask.split(","):
        match = _RANGE.match(part)
        if match is None:
            raise ParseError(f"invalid CPU mask element {part!r} in {mask!r}")
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) is not None else lo
        if hi < lo:
            raise ParseError(f"reversed CPU range {part.strip()!r} in {mask!r}")
        cpus.extend(range(lo, hi + 1))
    return cpus


def parse_multi_cpu_mask(mask: str) -> list[list[int]]:
    """Parse ``"0-2,5:all:1,5,6:2"`` into ``[[0,1,2,5], [-1], [1,5,6], [2]]``."""
    if not isinstance(mask, str):
        raise ParseError(f"CPU mask must be a string, not {type(mask).__name__}: {mask!r}")
    result: list[list[int]] = []
    for part in mask.split(":"):
        if part.strip().lower() == "all":
            result.append([CPU_ALL])
            continue
        cpus = parse_cpu_mask(part)
        if not cpus:
            raise ParseError(f"empty CPU mask element in {mask!r}")
        result.append(cpus)
    return result


def format_cpu_mask(cpus: Iterable[int]) -> str:
    """The compact form of a CPU list (inverse of :func:`parse_cpu_mask`)."""
    ordered = sorted(set(cpus))
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


def _is_cpu_mask_well_formed(mask: Any) -> bool:
    if isinstance(mask, str) and mask.strip().lower() == "all":
        return True
    try:
        return len(parse_cpu_mask(mask)) > 0
    except ParseError:
        return False


def _is_multi_cpu_mask_well_formed(mask: Any) -> bool:
    try:
        parse_multi_cpu_mask(mask)
    except ParseError:
        return False
    return True


# --- paths and URLs ----------------------------------------------------------


def is_norm_abs_path(path: Any) -> bool:
    """True for an absolute path already in normal form (no ``..``, ``//``)."""
    return isinstance(path, str) and os.path.isabs(path) and os.path.normpath(path) == path


_URL = re.compile(r"^(https?|ftp)://[^\s/]+(/\S*)?$")


def is_url(value: Any) -> bool:
    return isinstance(value, str) and _URL.match(value) is not None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --- the check tuples --------------------------------------------------------

_FILE_CHECK = (is_norm_abs_path, "must be an absolute normalized path", os.path.isfile, "not found or not a file")
_FILE_OR_URL_CHECK = (
    lambda x: is_norm_abs_path(x) or is_url(x),
    "must be an absolute normalized path or a URL",
    lambda x: os.path.isfile(x) or is_url(x),
    "not found or not a file or URL",
)
_DIR_CHECK = (is_norm_abs_path, "must be an absolute normalized path", os.path.isdir, "not found or not a directory")
_CPU_MASK_CHECK = (_is_cpu_mask_well_formed, "CPU mask definition is not well-formed", None, None)
_MULTI_CPU_MASK_CHECK = (_is_multi_cpu_mask_well_formed, "Multiple CPU mask definition is not well-formed", None, None)
# The seed used 0 < x < 65535 and so rejected the valid port 65535.
_NET_PORT_CHECK = (lambda x: _is_int(x) and 0 < x <= 65535, "invalid port number (1-65535)", None, None)
_VIRTIO_NET_QUEUES_CHECK = (lambda x: _is_int(x) and 0 < x < 9, "invalid number of queues (1-8)", None, None)
_NONNEGATIVE_INT_CHECK = (lambda x: _is_int(x) and x >= 0, "must be a non-negative integer", None, None)

REQ_FILE_CHECK = Check(True, *_FILE_CHECK)
OPT_FILE_CHECK = Check(False, *_FILE_CHECK)
REQ_FILE_OR_URL_CHECK = Check(True, *_FILE_OR_URL_CHECK)
OPT_FILE_OR_URL_CHECK = Check(False, *_FILE_OR_URL_CHECK)
REQ_DIR_CHECK = Check(True, *_DIR_CHECK)
OPT_DIR_CHECK = Check(False, *_DIR_CHECK)
REQ_NET_PORT_CHECK = Check(True, *_NET_PORT_CHECK)
OPT_NET_PORT_CHECK = Check(False, *_NET_PORT_CHECK)
REQ_VIRTIO_NET_QUEUES_CHECK = Check(True, *_VIRTIO_NET_QUEUES_CHECK)
OPT_VIRTIO_NET_QUEUES_CHECK = Check(False, *_VIRTIO_NET_QUEUES_CHECK)
REQ_CPU_MASK_CHECK = Check(True, *_CPU_MASK_CHECK)
OPT_CPU_MASK_CHECK = Check(False, *_CPU_MASK_CHECK)
REQ_MULTI_CPU_MASK_CHECK = Check(True, *_MULTI_CPU_MASK_CHECK)
OPT_MULTI_CPU_MASK_CHECK = Check(False, *_MULTI_CPU_MASK_CHECK)
REQ_NONNEGATIVE_INT_CHECK = Check(True, *_NONNEGATIVE_INT_CHECK)
OPT_NONNEGATIVE_INT_CHECK = Check(False, *_NONNEGATIVE_INT_CHECK)

NO_CHECK = Check(False, None, None, None, None)
REQUIRED_CHECK = Check(True, None, None, None, None)
MIGRATION_MODE_CHECK = Check(True, lambda x: x in MIGRATION_MODES, f"invalid migration mode (one of: {', '.join(MIGRATION_MODES)})", None, None)


def param_in_set(required: bool, values: Iterable[Any]) -> Check:
    """A check that the value is one of ``values``."""
    allowed = tuple(values)
    return Check(required, lambda x: x in allowed, "The value must be one of: " + ", ".join(map(str, allowed)), None, None)


def bool_check(required: bool = False) -> Check:
    """A check for a true boolean (not 0/1, not "yes")."""
    return Check(required, lambda x: isinstance(x, bool), "must be a boolean (true or false)", None, None)


def int_range_check(required: bool, lo: int, hi: int | None = None) -> Check:
    """An integer in ``[lo, hi]`` (``hi`` None: no upper bound)."""
    bound = f"{lo}-{hi}" if hi is not None else f">= {lo}"
    return Check(
        required,
        lambda x: _is_int(x) and x >= lo and (hi is None or x <= hi),
        f"must be an integer {bound}",
        None,
        None,
    )


def is_unspecified(value: Any) -> bool:
    """None and the empty string mean "not specified"."""
    return value is None or (isinstance(value, str) and value == "")


def _run(fn: Callable[[Any], bool], value: Any) -> bool:
    try:
        return bool(fn(value))
    except Exception:  # a check that cannot even look at the value fails it
        return False


def check_syntax(parameters: Mapping[str, Check | tuple], hvparams: Mapping[str, Any], *, hypervisor: str = "") -> None:
    """The master-side checks: unknown, missing, required-but-unset, syntax."""
    where = f" for hypervisor {hypervisor!r}" if hypervisor else ""
    if not isinstance(hvparams, Mapping):
        raise ParameterError(f"hvparams must be a mapping{where}, not {type(hvparams).__name__}")
    for key in hvparams:
        if key not in parameters:
            known = ", ".join(sorted(parameters)) or "none"
            raise ParameterError(f"Parameter {key!r} is not supported{where} (value: {hvparams[key]!r}; known: {known})")
    for name, check in parameters.items():
        required, syntax_fn, syntax_msg, _, _ = check
        if name not in hvparams:
            raise ParameterError(f"Parameter {name!r} is missing{where}")
        value = hvparams[name]
        if is_unspecified(value):
            if required:
                raise ParameterError(f"Parameter {name!r} is required but is not defined{where} (value: {value!r})")
            continue
        if syntax_fn is not None and not _run(syntax_fn, value):
            raise ParameterError(f"Parameter {name!r} fails syntax check: {syntax_msg} (value: {value!r}){where}")


def check_validity(parameters: Mapping[str, Check | tuple], hvparams: Mapping[str, Any], *, hypervisor: str = "") -> None:
    """The node-side checks (files exist, …), same error rules."""
    where = f" for hypervisor {hypervisor!r}" if hypervisor else ""
    for name, check in parameters.items():
        required, _, _, validity_fn, validity_msg = check
        if name not in hvparams:
            raise ParameterError(f"Parameter {name!r} is missing{where}")
        value = hvparams[name]
        if is_unspecified(value):
            if required:
                raise ParameterError(f"Parameter {name!r} is required but is not defined{where} (value: {value!r})")
            continue
        if validity_fn is not None and not _run(validity_fn, value):
            raise ParameterError(f"Parameter {name!r} fails validation: {validity_msg} (value: {value!r}){where}")
