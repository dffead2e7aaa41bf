"""The seed's parameter checks and CPU-mask parsers, ported."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hv import params
from hv.errors import ParameterError, ParseError


def test_parse_cpu_mask_examples() -> None:
    assert params.parse_cpu_mask("0-2,5") == [(0, 2), (5, 5)]
    assert params.parse_cpu_mask("7") == [(7, 7)]
    assert params.parse_cpu_mask("") == []
    assert params.parse_cpu_mask(" 1 - 3 , 8") == [(1, 3), (8, 8)]


def test_parse_multi_cpu_mask_example() -> None:
    all_ = [(params.CPU_ALL, params.CPU_ALL)]
    assert params.parse_multi_cpu_mask("0-2,5:all:1,5,6:2") == [[(0, 2), (5, 5)], all_, [(1, 1), (5, 5), (6, 6)], [(2, 2)]]
    assert params.parse_multi_cpu_mask("0-1:2-3:all") == [[(0, 1)], [(2, 3)], all_]


@pytest.mark.parametrize("mask", ["", " ", "\t"])
def test_unset_multi_cpu_mask_is_empty(mask: str) -> None:
    """An unset multi mask is not an error (Ganeti's ParseMultiCpuMask(""))."""
    assert params.parse_multi_cpu_mask(mask) == []


@pytest.mark.parametrize("bad", ["3-1", "-1", "a", "1,,2", "1-", "0-2;5", "1.5", "0x3", "1\n", "\u00a01", None, 5])
def test_parse_cpu_mask_rejects(bad: object) -> None:
    with pytest.raises(ParseError):
        params.parse_cpu_mask(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["0-1::2", "all:3-2", ":", "1:x", "0-1:"])
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
    ranges = params.parse_cpu_mask(mask)
    assert params.expand_cpu_ranges(ranges) == cpus
    assert params.cpu_mask_size(ranges) == len(cpus)
    assert params.format_cpu_ranges(ranges) == mask


@given(st.lists(st.one_of(st.just(None), cpu_sets), min_size=1, max_size=6))
def test_multi_cpu_mask_round_trip(groups: list[set[int] | None]) -> None:
    mask = ":".join("all" if g is None else params.format_cpu_mask(g) for g in groups)
    parsed = params.parse_multi_cpu_mask(mask)
    assert len(parsed) == len(groups)
    for entry, g in zip(parsed, groups):
        assert params.is_all_cpus(entry) if g is None else params.expand_cpu_ranges(entry) == g


@given(st.integers(min_value=0, max_value=1000), st.integers(min_value=1, max_value=1000))
def test_reversed_ranges_always_rejected(lo: int, gap: int) -> None:
    with pytest.raises(ParseError):
        params.parse_cpu_mask(f"{lo + gap}-{lo}")


@given(st.text(alphabet="abcxyz!@#;. ", min_size=1, max_size=10).filter(lambda s: s.strip()))
def test_junk_always_rejected(junk: str) -> None:
    with pytest.raises(ParseError):
        params.parse_cpu_mask(junk)


def _syntax(check: params.Check, value: object) -> bool:
    return check.syntax_fn is None or params._run(check.syntax_fn, value)[0]


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


@pytest.mark.parametrize(
    ("check", "fails"), [(params.check_syntax, "fails syntax check"), (params.check_validity, "fails validation")]
)
@pytest.mark.parametrize(
    ("hvparams", "words"),
    [
        ({k: v for k, v in good().items() if k != "vnc_port"}, ["'vnc_port'", "missing", "'test'"]),
        (good(must=""), ["'must'", "required", "''", "'test'"]),
        (["kernel_path"], ["hvparams must be a mapping", "'test'", "list"]),
        (good(cpu_mask=5), ["'cpu_mask'", "{fails}", "(value: 5)", "'test'"]),
    ],
)
def test_both_passes_apply_one_rule_set(check, fails: str, hvparams: object, words: list[str], monkeypatch) -> None:
    """Syntax and validity are one loop over the two halves of a check: same rules, each its own wording."""
    monkeypatch.setattr(params, "node_possible_cpus", lambda path=params.POSSIBLE_CPUS_FILE: [(0, 3)])
    with pytest.raises(ParameterError) as err:
        check(TABLE, hvparams, hypervisor="test")
    for word in words:
        assert word.format(fails=fails) in str(err.value)


# --- bounded CPU masks (issue 9, item 6) ---------------------------------------


@pytest.mark.parametrize(
    ("mask", "ranges"),
    [("0-8191", [(0, 8191)]), ("8191", [(8191, 8191)]), ("0-8191,0-8191", [(0, 8191), (0, 8191)]), ("00007", [(7, 7)])],
)
def test_cpu_masks_up_to_the_bound_parse_as_ranges(mask: str, ranges: list[tuple[int, int]]) -> None:
    """The parser keeps ranges as pairs: nothing is expanded, whatever the width."""
    assert params.parse_cpu_mask(mask) == ranges
    assert params.cpu_mask_size(ranges) == params.cpu_mask_size(params.merge_cpu_ranges(ranges))


@pytest.mark.parametrize("mask", ["0-30000000", "8192", "0-8192", "1,99999999999999999999999999", "0-1:0-30000000", "1" * 5000])
def test_cpu_numbers_above_the_bound_are_refused_naming_it(mask: str) -> None:
    with pytest.raises(ParseError, match=f"above the maximum CPU number {params.MAX_CPU_NUMBER}") as err:
        params.parse_multi_cpu_mask(mask)
    assert len(str(err.value)) < 300  # the mask is echoed cut short
    with pytest.raises(ParameterError, match="cpu_mask.*above the maximum CPU number 8191"):
        params.check_syntax({"cpu_mask": params.OPT_MULTI_CPU_MASK_CHECK}, {"cpu_mask": mask})


@pytest.mark.parametrize("digit", ["\u0663", "\uff13", "\u00b2", "\u0e53", "\U0001d7d1"])
@pytest.mark.parametrize("template", ["{d}", "0-{d}", "1,{d}", "0:{d}"])
def test_non_ascii_digits_are_refused_naming_the_character(digit: str, template: str) -> None:
    assert digit.isdigit() or digit.isnumeric()  # what Python's int()/isdigit would have let through
    with pytest.raises(ParseError) as err:
        params.parse_multi_cpu_mask(template.format(d=digit))
    assert repr(digit) in str(err.value) and f"U+{ord(digit):04X}" in str(err.value)


def test_oversized_mask_string_is_refused_unread() -> None:
    mask = "0," * params.MAX_CPU_MASK_CHARS
    with pytest.raises(ParseError, match="characters long"):
        params.parse_cpu_mask(mask)


def test_expansion_is_bounded_and_merged() -> None:
    assert params.expand_cpu_ranges([(0, 8191)] * 1000) == set(range(8192))
    with pytest.raises(ParseError, match="names 8 CPUs, more than 4"):
        params.expand_cpu_ranges([(0, 3), (4, 7)], limit=4)


@pytest.mark.parametrize(
    ("mask", "possible", "error"),
    [
        ("0-1", [(0, 1)], None),
        ("all", [(0, 1)], None),
        ("0:1:all", [(0, 1)], None),
        ("", [(0, 1)], None),
        ("40", [(0, 1)], "CPU 40 is beyond this node's CPUs 0-1"),
        ("0-2", [(0, 1)], "CPU 2 is beyond this node's CPUs 0-1"),
        ("0:1:5", [(0, 3), (6, 7)], "CPU 5 is beyond this node's CPUs 0-3,6-7"),
        ("0-8191", [(0, 3), (5, 8191)], "CPU 4 is beyond this node's CPUs 0-3,5-8191"),
    ],
)
def test_cpu_mask_validity_against_the_node(mask: str, possible: list[tuple[int, int]], error: str | None, monkeypatch) -> None:
    monkeypatch.setattr(params, "node_possible_cpus", lambda path=params.POSSIBLE_CPUS_FILE: possible)
    table = {"cpu_mask": params.OPT_MULTI_CPU_MASK_CHECK}
    if error is None:
        params.check_validity(table, {"cpu_mask": mask})
    else:
        with pytest.raises(ParameterError, match=f"'cpu_mask'.*{error}"):
            params.check_validity(table, {"cpu_mask": mask})


@pytest.mark.parametrize(("text", "expected"), [("0-3\n", [(0, 3)]), ("0,2-5\n", [(0, 0), (2, 5)]), ("junk", None), (None, None)])
def test_node_possible_cpus_reads_sysfs_or_falls_back(tmp_path, text: str | None, expected: list | None) -> None:
    path = tmp_path / "possible"
    if text is not None:
        path.write_text(text)
    fallback = [(0, (os.cpu_count() or 1) - 1)]
    assert params.node_possible_cpus(str(path)) == (expected if expected is not None else fallback)


@pytest.mark.parametrize("value", ["x" * 10_000, "3" * 100_000 + "-1", "0," * 50_000 + "x"])
@pytest.mark.parametrize("as_key", [False, True])
def test_echoed_values_are_cut_short_with_their_length(value: str, as_key: bool) -> None:
    table = {"cpu_mask": params.OPT_MULTI_CPU_MASK_CHECK}
    hvparams = {"cpu_mask": "", value: 1} if as_key else {"cpu_mask": value}
    for check in (params.check_syntax, params.check_validity):
        if as_key and check is params.check_validity:
            continue  # unknown keys are the syntax check's business
        with pytest.raises(ParameterError) as err:
            check(table, hvparams)
        assert len(str(err.value)) < 400
        assert f"({len(value)} chars)" in str(err.value)
