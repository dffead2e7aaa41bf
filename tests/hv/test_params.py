"""The seed's parameter checks and CPU-mask parsers, ported."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hv import params
from hv.errors import ParameterError, ParseError


def test_parse_cpu_mask_examples() -> None:
    assert params.parse_cpu_mask("0-2,5") == [0, 1, 2, 5]
    assert params.parse_cpu_mask("7") == [7]
    assert params.parse_cpu_mask("") == []
    assert params.parse_cpu_mask(" 1 - 3 , 8") == [1, 2, 3, 8]


def test_parse_multi_cpu_mask_example() -> None:
    assert params.parse_multi_cpu_mask("0-2,5:all:1,5,6:2") == [[0, 1, 2, 5], [-1], [1, 5, 6], [2]]


@pytest.mark.parametrize("bad", ["3-1", "-1", "a", "1,,2", "1-", "0-2;5", "1.5", "0x3", None, 5])
def test_parse_cpu_mask_rejects(bad: object) -> None:
    with pytest.raises(ParseError):
        params.parse_cpu_mask(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["0-1::2", "all:3-2", ":", "1:x", ""])
def test_parse_multi_cpu_mask_rejects(bad: str) -> None:
    with pytest.raises(ParseError):
        params.parse_multi_cpu_mask(bad)


def test_parse_error_is_value_error() -> None:
    with pytest.raises(ValueError):
        params.parse_cpu_mask("junk")


cpu_sets = st.sets(st.integers(min_value=0, max_value=512), min_size=1, max_size=40)


@given(cpu_sets)
def test_cpu_mask_round_trip(cpus: set[int]) -> None:
    mask = params.format_cpu_mask(cpus)
    assert params.parse_cpu_mask(mask) == sorted(cpus)


@given(st.lists(st.one_of(st.just(None), cpu_sets), min_size=1, max_size=6))
def test_multi_cpu_mask_round_trip(groups: list[set[int] | None]) -> None:
    mask = ":".join("all" if g is None else params.format_cpu_mask(g) for g in groups)
    expected = [[params.CPU_ALL] if g is None else sorted(g) for g in groups]
    assert params.parse_multi_cpu_mask(mask) == expected


@given(st.integers(min_value=0, max_value=1000), st.integers(min_value=1, max_value=1000))
def test_reversed_ranges_always_rejected(lo: int, gap: int) -> None:
    with pytest.raises(ParseError):
        params.parse_cpu_mask(f"{lo + gap}-{lo}")


@given(st.text(alphabet="abcxyz!@#;. ", min_size=1, max_size=10).filter(lambda s: s.strip()))
def test_junk_always_rejected(junk: str) -> None:
    with pytest.raises(ParseError):
        params.parse_cpu_mask(junk)


def _syntax(check: params.Check, value: object) -> bool:
    return check.syntax_fn is None or params._run(check.syntax_fn, value)


def test_cpu_mask_check_needs_non_empty_mask() -> None:
    assert _syntax(params.REQ_CPU_MASK_CHECK, "0-3")
    assert _syntax(params.REQ_CPU_MASK_CHECK, "all")
    assert not _syntax(params.REQ_CPU_MASK_CHECK, " ")
    assert not _syntax(params.REQ_CPU_MASK_CHECK, "3-0")
    assert _syntax(params.OPT_MULTI_CPU_MASK_CHECK, "0-1:2-3:all")
    assert not _syntax(params.OPT_MULTI_CPU_MASK_CHECK, "0-1::all")


@pytest.mark.parametrize(("port", "ok"), [(0, False), (1, True), (22, True), (65535, True), (65536, False), (-1, False), ("80", False), (True, False)])
def test_net_port_check(port: object, ok: bool) -> None:
    assert _syntax(params.REQ_NET_PORT_CHECK, port) is ok


@pytest.mark.parametrize(("queues", "ok"), [(0, False), (1, True), (8, True), (9, False)])
def test_virtio_net_queues_check(queues: int, ok: bool) -> None:
    assert _syntax(params.OPT_VIRTIO_NET_QUEUES_CHECK, queues) is ok


def test_nonnegative_and_sets() -> None:
    assert _syntax(params.OPT_NONNEGATIVE_INT_CHECK, 0)
    assert not _syntax(params.OPT_NONNEGATIVE_INT_CHECK, -1)
    assert _syntax(params.MIGRATION_MODE_CHECK, "live")
    assert not _syntax(params.MIGRATION_MODE_CHECK, "teleport")
    check = params.param_in_set(True, ["a", "b"])
    assert check.required and _syntax(check, "a") and not _syntax(check, "c")
    assert "a, b" in (check.syntax_msg or "")


def test_file_checks(tmp_path) -> None:
    f = tmp_path / "kernel"
    f.write_text("x")
    assert _syntax(params.OPT_FILE_CHECK, str(f))
    assert not _syntax(params.OPT_FILE_CHECK, "relative/path")
    assert not _syntax(params.OPT_FILE_CHECK, "/a/../b")
    assert params.OPT_FILE_CHECK.validity_fn(str(f))
    assert not params.OPT_FILE_CHECK.validity_fn(str(tmp_path / "missing"))
    assert params.OPT_DIR_CHECK.validity_fn(str(tmp_path))
    assert _syntax(params.OPT_FILE_OR_URL_CHECK, "http://example.invalid/kernel")
    assert not _syntax(params.OPT_FILE_OR_URL_CHECK, "ftp:/nope")


TABLE = {
    "kernel_path": params.OPT_FILE_CHECK,
    "vnc_port": params.REQ_NET_PORT_CHECK,
    "cpu_mask": params.OPT_CPU_MASK_CHECK,
    "opaque": params.NO_CHECK,
    "must": params.REQUIRED_CHECK,
}


def good(**over: object) -> dict[str, object]:
    base: dict[str, object] = {"kernel_path": "", "vnc_port": 5900, "cpu_mask": "all", "opaque": None, "must": "x"}
    base.update(over)
    return base


def test_check_syntax_accepts_good_and_unset_optional() -> None:
    params.check_syntax(TABLE, good())
    params.check_syntax(TABLE, good(kernel_path=None, cpu_mask=""))


@pytest.mark.parametrize(
    ("hvparams", "words"),
    [
        (good(bogus=1), ["'bogus'", "not supported", "1"]),
        ({k: v for k, v in good().items() if k != "vnc_port"}, ["'vnc_port'", "missing"]),
        (good(must=""), ["'must'", "required", "''"]),
        (good(vnc_port=None), ["'vnc_port'", "required", "None"]),
        (good(vnc_port=70000), ["'vnc_port'", "invalid port", "70000"]),
        (good(cpu_mask="2-1"), ["'cpu_mask'", "not well-formed", "'2-1'"]),
        (good(kernel_path="rel"), ["'kernel_path'", "absolute", "'rel'"]),
    ],
)
def test_check_syntax_errors_name_parameter_rule_and_value(hvparams: dict, words: list[str]) -> None:
    with pytest.raises(ParameterError) as err:
        params.check_syntax(TABLE, hvparams, hypervisor="test")
    for word in words:
        assert word in str(err.value)


def test_check_validity_runs_node_side_checks(tmp_path) -> None:
    params.check_validity(TABLE, good())  # optional unset file: fine
    with pytest.raises(ParameterError, match="kernel_path.*not found"):
        params.check_validity(TABLE, good(kernel_path=str(tmp_path / "nope")))
    f = tmp_path / "k"
    f.write_bytes(b"")
    params.check_validity(TABLE, good(kernel_path=os.fspath(f)))
