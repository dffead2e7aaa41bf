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

from .errors import HypervisorError, ParameterError, ParseError

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

#: The highest CPU number a mask may name anywhere: Linux's largest NR_CPUS is
#: 8192 (CPUs 0-8191). Checked at syntax time, so a mask's size is bounded
#: before the node compares it with its own CPUs.
MAX_CPU_NUMBER = 8191
#: The longest mask string looked at (a mask naming each of 8192 CPUs, one
#: entry per vCPU, fits many times over); longer is refused unread.
MAX_CPU_MASK_CHARS = 1 << 18
#: Where the node reads which CPU numbers it can ever have.
POSSIBLE_CPUS_FILE = "/sys/devices/system/cpu/possible"

#: A closed range of CPU numbers ``(lo, hi)``; one CPU is ``(n, n)``.
CpuRange = tuple[int, int]
#: What a multi mask's ``all`` entry parses to.
ALL_CPUS: tuple[CpuRange, ...] = ((CPU_ALL, CPU_ALL),)

_DIGITS = frozenset("0123456789")
_BLANKS = " \t"


def shorten(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to about ``limit`` characters, naming the full length when cut."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f" ({len(value)} chars)" if isinstance(value, (str, bytes)) else ""
    return f"{text[:limit]}...{size}"


def _element(part: str, mask: str) -> str:
    """``'PART' in 'MASK'`` for messages, each cut short; just the mask when they are the same."""
    if part.strip(_BLANKS) == mask.strip(_BLANKS):
        return shorten(mask)
    return f"{shorten(part)} in {shorten(mask)}"


def _cpu_number(text: str, part: str, mask: str) -> int:
    """One CPU number: ASCII digits only, at most :data:`MAX_CPU_NUMBER`."""
    text = text.strip(_BLANKS)
    if not text:
        raise ParseError(f"invalid CPU mask element {_element(part, mask)}: a CPU number is missing")
    for ch in text:
        if ch not in _DIGITS:
            what = f"non-ASCII character {ch!r} (U+{ord(ch):04X})" if not ch.isascii() else f"character {ch!r}"
            raise ParseError(f"invalid CPU mask element {_element(part, mask)}: {what} is not a digit 0-9")
    if len(text) > len(str(MAX_CPU_NUMBER)) + 4 or int(text) > MAX_CPU_NUMBER:
        raise ParseError(f"CPU {shorten(text, 20)} in {_element(part, mask)} is above the maximum CPU number {MAX_CPU_NUMBER}")
    return int(text)


def _check_mask_string(mask: Any) -> str:
    if not isinstance(mask, str):
        raise ParseError(f"CPU mask must be a string, not {type(mask).__name__}: {shorten(mask)}")
    if len(mask) > MAX_CPU_MASK_CHARS:
        raise ParseError(f"CPU mask is {len(mask)} characters long, more than the {MAX_CPU_MASK_CHARS} allowed")
    return mask


def parse_cpu_mask(mask: str) -> list[CpuRange]:
    """Parse ``"0-2,5"`` into ranges ``[(0, 2), (5, 5)]`` (never expanded); ``""`` is ``[]``.

    CPU numbers are ASCII digits in 0..:data:`MAX_CPU_NUMBER`. Raises
    :class:`ParseError` for reversed ranges, negatives, other digits and junk.
    """
    _check_mask_string(mask)
    if not mask.strip(_BLANKS):
        return []
    ranges: list[CpuRange] = []
    for part in mask.split(","):
        lo_text, dash, hi_text = part.partition("-")
        lo = _cpu_number(lo_text, part, mask)
        hi = _cpu_number(hi_text, part, mask) if dash else lo
        if hi < lo:
            raise ParseError(f"reversed CPU range {_element(part, mask)}")
        ranges.append((lo, hi))
    return ranges


def parse_multi_cpu_mask(mask: str) -> list[list[CpuRange]]:
    """Parse ``"0-2,5:all:1"`` into ``[[(0, 2), (5, 5)], [ALL], [(1, 1)]]`` (``ALL`` = ``(CPU_ALL, CPU_ALL)``).

    ``""`` is ``[]`` (an unset multi mask, as Ganeti's ``ParseMultiCpuMask``);
    an empty entry between colons is an error.
    """
    _check_mask_string(mask)
    if not mask.strip(_BLANKS):
        return []
    result: list[list[CpuRange]] = []
    for part in mask.split(":"):
        if part.strip(_BLANKS).lower() == "all":
            result.append(list(ALL_CPUS))
            continue
        ranges = parse_cpu_mask(part)
        if not ranges:
            raise ParseError(f"empty CPU mask element in {shorten(mask)}")
        result.append(ranges)
    return result


def is_all_cpus(ranges: Iterable[CpuRange]) -> bool:
    """True for a multi mask's ``all`` entry."""
    return tuple(ranges) == ALL_CPUS


def merge_cpu_ranges(ranges: Iterable[CpuRange]) -> list[CpuRange]:
    """Sorted, non-overlapping, non-adjacent ranges covering the same CPUs."""
    merged: list[CpuRange] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


def cpu_mask_size(ranges: Iterable[CpuRange]) -> int:
    """How many distinct CPUs ``ranges`` name (computed, not expanded)."""
    return sum(hi - lo + 1 for lo, hi in merge_cpu_ranges(ranges))


def expand_cpu_ranges(ranges: Iterable[CpuRange], limit: int = MAX_CPU_NUMBER + 1) -> set[int]:
    """The CPU numbers of ``ranges`` as a set, refusing more than ``limit`` of them."""
    merged = merge_cpu_ranges(ranges)
    size = sum(hi - lo + 1 for lo, hi in merged)
    if size > limit:
        raise ParseError(f"CPU mask {format_cpu_ranges(merged)!r} names {size} CPUs, more than {limit}")
    return {cpu for lo, hi in merged for cpu in range(lo, hi + 1)}


def format_cpu_ranges(ranges: Iterable[CpuRange]) -> str:
    """The compact form of ranges (merged): ``[(0, 2), (3, 3), (7, 7)]`` → ``"0-3,7"``."""
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in merge_cpu_ranges(ranges))


def format_cpu_mask(cpus: Iterable[int]) -> str:
    """The compact form of a CPU list (inverse of :func:`parse_cpu_mask`)."""
    return format_cpu_ranges((c, c) for c in cpus)


def node_possible_cpus(path: str = POSSIBLE_CPUS_FILE) -> list[CpuRange]:
    """The CPU numbers this node can have: ``path`` (Linux), else ``os.cpu_count()``."""
    try:
        with open(path, encoding="ascii") as fh:
            ranges = parse_cpu_mask(fh.read().strip())
        if ranges:
            return merge_cpu_ranges(ranges)
    except (OSError, UnicodeDecodeError, ParseError):
        pass
    return [(0, max(1, os.cpu_count() or 1) - 1)]


def check_cpus_on_node(ranges: Iterable[CpuRange], possible: list[CpuRange] | None = None) -> None:
    """Raise :class:`ParseError` naming the first CPU of ``ranges`` this node cannot have."""
    possible = merge_cpu_ranges(possible if possible is not None else node_possible_cpus())
    for lo, hi in merge_cpu_ranges(r for r in ranges if r != (CPU_ALL, CPU_ALL)):
        cpu = lo
        while cpu <= hi:
            span = next(((a, b) for a, b in possible if a <= cpu <= b), None)
            if span is None:
                raise ParseError(f"CPU {cpu} is beyond this node's CPUs {format_cpu_ranges(possible)}")
            cpu = span[1] + 1


def _cpu_mask_well_formed(mask: Any) -> bool:
    """Syntax: ``all`` or a non-empty mask (raises ParseError saying why not)."""
    if isinstance(mask, str) and mask.strip(_BLANKS).lower() == "all":
        return True
    if not parse_cpu_mask(mask):
        raise ParseError("the CPU mask is empty")
    return True


def _multi_cpu_mask_well_formed(mask: Any) -> bool:
    parse_multi_cpu_mask(mask)
    return True


def _cpu_mask_on_node(mask: Any) -> bool:
    if isinstance(mask, str) and mask.strip(_BLANKS).lower() == "all":
        return True
    check_cpus_on_node(parse_cpu_mask(mask))
    return True


def _multi_cpu_mask_on_node(mask: Any) -> bool:
    check_cpus_on_node(r for entry in parse_multi_cpu_mask(mask) for r in entry)
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
_CPU_MASK_CHECK = (_cpu_mask_well_formed, "CPU mask definition is not well-formed", _cpu_mask_on_node, "CPU mask does not fit this node")
_MULTI_CPU_MASK_CHECK = (
    _multi_cpu_mask_well_formed,
    "Multiple CPU mask definition is not well-formed",
    _multi_cpu_mask_on_node,
    "CPU mask does not fit this node",
)
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


def _run(fn: Callable[[Any], bool], value: Any) -> tuple[bool, str]:
    """(passed, why not): a check may raise a HypervisorError whose message says why."""
    try:
        return bool(fn(value)), ""
    except HypervisorError as err:
        return False, err.message
    except Exception:  # a check that cannot even look at the value fails it
        return False, ""


#: Which half of a :class:`Check` each pass applies: (function index, message index, what failing is called).
_PASSES: dict[str, tuple[int, int, str]] = {
    "syntax": (1, 2, "fails syntax check"),
    "validity": (3, 4, "fails validation"),
}


def _check(
    parameters: Mapping[str, Check | tuple], hvparams: Mapping[str, Any], *, hypervisor: str, which: str
) -> None:
    """One loop for both passes: missing, required-but-unset, then the pass's half of each check."""
    fn_at, msg_at, fails = _PASSES[which]
    where = f" for hypervisor {hypervisor!r}" if hypervisor else ""
    if not isinstance(hvparams, Mapping):
        raise ParameterError(f"hvparams must be a mapping{where}, not {type(hvparams).__name__}")
    for name, check in parameters.items():
        required, fn, msg = check[0], check[fn_at], check[msg_at]
        if name not in hvparams:
            raise ParameterError(f"Parameter {name!r} is missing{where}")
        value = hvparams[name]
        if is_unspecified(value):
            if required:
                raise ParameterError(f"Parameter {name!r} is required but is not defined{where} (value: {shorten(value)})")
            continue
        if fn is not None:
            ok, why = _run(fn, value)
            if not ok:
                detail = f": {why}" if why else ""
                raise ParameterError(f"Parameter {name!r} {fails}: {msg}{detail} (value: {shorten(value)}){where}")


def check_syntax(parameters: Mapping[str, Check | tuple], hvparams: Mapping[str, Any], *, hypervisor: str = "") -> None:
    """The master-side checks: unknown, missing, required-but-unset, syntax."""
    if isinstance(hvparams, Mapping):
        where = f" for hypervisor {hypervisor!r}" if hypervisor else ""
        for key in hvparams:
            if key not in parameters:
                known = ", ".join(sorted(parameters)) or "none"
                raise ParameterError(f"Parameter {shorten(key)} is not supported{where} (value: {shorten(hvparams[key])}; known: {known})")
    _check(parameters, hvparams, hypervisor=hypervisor, which="syntax")


def check_validity(parameters: Mapping[str, Check | tuple], hvparams: Mapping[str, Any], *, hypervisor: str = "") -> None:
    """The node-side checks (files exist, …), same error rules."""
    _check(parameters, hvparams, hypervisor=hypervisor, which="validity")
