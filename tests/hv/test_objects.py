"""Backend parameters are checked when built and when decoded (issue 9, item 6)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

import hv
from hv._objects import MAX_MEMORY_MIB, MAX_VCPUS


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({"maxmem": 512, "colour": 1}, ["unknown key 'colour'", "minmem, maxmem, vcpus"]),
        ({"memory": 512}, ["unknown key 'memory'"]),
        ({"minmem": 600, "maxmem": 512}, ["'minmem' (600 MiB) is above 'maxmem' (512 MiB)"]),
        ({"minmem": 0, "maxmem": 512}, ["'minmem' must be 1-16777216 MiB, not 0"]),
        ({"minmem": -1, "maxmem": 512}, ["'minmem'", "not -1"]),
        ({"minmem": 1, "maxmem": MAX_MEMORY_MIB + 1}, ["'maxmem' must be 1-16777216 MiB"]),
        ({"vcpus": 0}, ["'vcpus' must be 1-8192, not 0"]),
        ({"vcpus": MAX_VCPUS + 1}, ["'vcpus' must be 1-8192"]),
        ({"vcpus": True}, ["vcpus", "bool"]),
        ({"maxmem": 512.0}, ["maxmem", "float"]),
        ({"maxmem": "512"}, ["maxmem", "str"]),
        ([("maxmem", 512)], ["must be a mapping"]),
    ],
)
def test_bad_beparams_are_refused_naming_the_key(data: Any, words: list[str]) -> None:
    with pytest.raises(hv.ParameterError) as err:
        hv.BeParams.from_mapping(data, where="cluster.toml [instances.web1]")
    for word in words:
        assert word in str(err.value)
    assert str(err.value).startswith("cluster.toml [instances.web1]: ")
    if isinstance(data, dict):
        # decoding an Instance (what the engine and transport do) refuses it too, with the path
        with pytest.raises(msgspec.ValidationError, match=r"\$\.beparams"):
            msgspec.convert({"name": "web1", "beparams": data}, hv.Instance)


@pytest.mark.parametrize(
    "kwargs",
    [{"minmem": 600, "maxmem": 512}, {"maxmem": 0}, {"vcpus": MAX_VCPUS + 1}, {"vcpus": "2"}, {"minmem": True}],
)
def test_building_bad_beparams_raises_parameter_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(hv.ParameterError):
        hv.BeParams(**kwargs)


@pytest.mark.parametrize(
    "data",
    [{}, {"maxmem": 512}, {"minmem": 1, "maxmem": MAX_MEMORY_MIB, "vcpus": MAX_VCPUS}, {"minmem": 256, "maxmem": 256, "vcpus": 2}],
)
def test_good_beparams_round_trip(data: dict[str, Any]) -> None:
    be = hv.BeParams.from_mapping(data)
    assert msgspec.json.decode(msgspec.json.encode(be), type=hv.BeParams) == be
    for key, value in data.items():
        assert getattr(be, key) == value
