"""Error frames: the engine rebuilds the nearest known hv class, and only a known one."""

from __future__ import annotations

from typing import Any

import pytest

import hv
import transport
from hv.errors import ERROR_CLASSES
from transport.protocol import error_from_payload, error_payload

from .drivers import DiskTimeout, StreamStalledLike


def _rebuild(payload: Any) -> Exception:
    return error_from_payload(payload, node="n1", method="verify")


@pytest.mark.parametrize("cls", [*ERROR_CLASSES.values(), StreamStalledLike, DiskTimeout])
def test_every_hv_error_round_trips_to_itself_or_its_nearest_public_ancestor(cls: type[hv.HypervisorError]) -> None:
    err = _rebuild(error_payload(cls("it broke", node="n2"), node="n1"))
    nearest = next(c for c in cls.__mro__ if c in ERROR_CLASSES.values())
    assert type(err) is nearest
    assert err.message == "it broke" and err.node == "n2" and err.remote_type == cls.__name__


def _odd_classes() -> list[type[hv.HypervisorError]]:
    long_named = type("L" * 300, (hv.InstanceNotFound,), {})
    deep: type[hv.HypervisorError] = hv.HypervisorTimeout
    for i in range(40):
        deep = type(f"Deep{i}", (deep,), {})
    return [long_named, deep]


@pytest.mark.parametrize("cls", _odd_classes(), ids=["long-name", "deep-tree"])
def test_an_odd_error_class_still_crosses_as_its_nearest_public_ancestor(cls: type[hv.HypervisorError]) -> None:
    """A name too long or a tree too deep for the frame limits must not turn the error into a ProtocolError."""
    err = _rebuild(error_payload(cls("odd", node="n2"), node="n1"))
    nearest = next(c for c in cls.__mro__ if c in ERROR_CLASSES.values())
    assert type(err) is nearest and err.message == "odd" and err.node == "n2"


@pytest.mark.parametrize(
    ("payload", "expected", "text"),
    [
        # An older agent: no "mro", today's behaviour.
        pytest.param({"kind": "hv", "class": "MigrationError", "message": "m"}, hv.MigrationError, "m", id="old-known"),
        pytest.param({"kind": "hv", "class": "StreamStalled", "message": "m"}, hv.HypervisorError, "StreamStalled: m", id="old-unknown"),
        # Bare names as well as qualified ones.
        pytest.param(
            {"kind": "hv", "class": "X", "mro": ["X", "HypervisorTimeout", "HypervisorError"], "message": "m"},
            hv.HypervisorTimeout, "m", id="bare-names",
        ),
        # A hostile node naming classes outside the hv tree gets none of them built.
        pytest.param(
            {"kind": "hv", "class": "SystemExit", "mro": ["builtins.SystemExit", "os.system", "subprocess.Popen"], "message": "m"},
            hv.HypervisorError, "m", id="foreign-classes",
        ),
        pytest.param(
            {"kind": "hv", "class": "NodeUnreachable", "mro": ["transport.errors.NodeUnreachable", "KeyboardInterrupt"], "message": "m"},
            hv.HypervisorError, "m", id="not-hv-classes",
        ),
        # Only an hv error may name an hv class: an internal error stays a plain HypervisorError.
        pytest.param(
            {"kind": "internal", "class": "MigrationError", "mro": ["hv.errors.MigrationError"], "message": "m"},
            hv.HypervisorError, "MigrationError: m", id="internal-kind",
        ),
    ],
)
def test_error_frame_builds_only_known_hv_classes(payload: dict, expected: type, text: str) -> None:
    err = _rebuild(payload)
    assert type(err) is expected and err.message == text and err.node == "n1"
    assert err.remote_type == payload["class"]


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        pytest.param({"kind": "hv", "class": "X", "mro": "hv.errors.MigrationError", "message": "m"}, "'mro'", id="mro-string"),
        pytest.param({"kind": "hv", "class": "X", "mro": [], "message": "m"}, "'mro'", id="mro-empty"),
        pytest.param({"kind": "hv", "class": "X", "mro": [1, 2], "message": "m"}, "'mro'", id="mro-not-names"),
        pytest.param({"kind": "hv", "class": "X", "mro": ["a" * 5000], "message": "m"}, "'mro'", id="mro-long-name"),
        pytest.param({"kind": "hv", "class": "X", "mro": ["HypervisorError"] * 1000, "message": "m"}, "'mro'", id="mro-long-list"),
        pytest.param({"kind": "hv", "class": ["MigrationError"], "message": "m"}, "'class'", id="class-not-string"),
        pytest.param({"kind": "hv", "class": "MigrationError", "message": 3}, "malformed error", id="message-not-string"),
    ],
)
def test_malformed_error_frame_is_a_protocol_error_naming_the_field(payload: dict, field: str) -> None:
    err = _rebuild(payload)
    assert isinstance(err, transport.ProtocolError) and err.node == "n1"
    assert field in err.message and "in reply to verify" in err.message
    assert "\n" not in err.message
