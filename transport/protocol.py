"""The node agent's wire protocol: newline-delimited JSON frames.

Why NDJSON: a line is trivially framed over an SSH exec channel (stdin /
stdout of the agent), debuggable by eye, and JSON carries every hv Struct
through msgspec. A frame is one JSON object on one line; every frame carries
the protocol version ``v``.

Frames (``id`` is an int or a str chosen by the caller, unique while in flight)::

    agent → client   {"v": 1, "hello": {"node": …, "hypervisor": …, "pid": …}}
    client → agent   {"v": 1, "id": 7, "method": "get_node_info", "params": {"hvparams": null}, "timeout": 30.0}
    client → agent   {"v": 1, "id": 7, "cancel": true}
    agent → client   {"v": 1, "id": 7, "progress": {…}}              (0..n, long calls)
    agent → client   {"v": 1, "id": 7, "result": …}                  (one of these three)
    agent → client   {"v": 1, "id": 7, "error": {"kind", "class", "mro", "message", "node"}}
    agent → client   {"v": 1, "id": 7, "cancelled": true}            (after a cancel: cleanup ran)

``params`` maps the driver method's parameter names to their values; both
sides decode values against :class:`hv.BaseHypervisor`'s annotations (see
:data:`METHODS`), so a wrong type is refused with the parameter and the path
inside it. An error about a frame that has no usable id carries ``"id": null``.
``timeout`` (optional, seconds) is the call's own deadline: the agent cancels
the call when it runs out even if the client's cancel frame never arrives
(a partition), and answers with an error of kind ``timeout``.
An hv error's ``mro`` lists the qualified names of its classes up to
HypervisorError (``["hv.fake._driver.StreamStalled", "hv.errors.MigrationError",
"hv.errors.HypervisorError"]``): the engine rebuilds the first one it knows
(see :func:`error_from_payload`); an older agent's frame without it still works.
"""

from __future__ import annotations

import inspect
import itertools
import operator
import re
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from hv import REMOTE_METHODS, BaseHypervisor
from hv.errors import ERROR_CLASSES, HypervisorError

from .errors import CallTimeout, ProtocolError

#: Bumped on any incompatible change of the frames or of a method's encoding.
PROTOCOL_VERSION = 1

#: Largest frame the agent accepts (a request); bigger ones are refused whole.
MAX_REQUEST_FRAME = 1 << 20
#: Largest frame the client accepts (a reply can carry a long instance list).
MAX_REPLY_FRAME = 16 << 20

#: Deepest nesting of arrays/objects a frame may have. Legitimate frames nest a
#: handful of levels (hv Structs inside a list inside ``params``); a bound keeps
#: msgspec's decoder (which recurses, and raises RecursionError near the
#: interpreter's limit of ~1000) and every later walk of the value safe.
MAX_NESTING = 64

#: Error ``kind`` values: a driver's hv error, a broken frame, a driver bug.
KIND_HV = "hv"
KIND_PROTOCOL = "protocol"
KIND_INTERNAL = "internal"
KIND_TIMEOUT = "timeout"  # the call's own deadline ran out on the node

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()


@dataclass(frozen=True)
class MethodSpec:
    """What crosses the wire for one method: parameter types and result type."""

    name: str
    signature: inspect.Signature
    params: dict[str, Any]  # name → type (annotation)
    required: frozenset[str]
    result: Any


def _build_spec(name: str, func: Callable[..., Any], hints: dict[str, Any] | None = None) -> MethodSpec:
    sig = inspect.signature(func)
    hints = typing.get_type_hints(func) if hints is None else hints
    params: dict[str, Any] = {}
    required: set[str] = set()
    for pname, param in sig.parameters.items():
        if pname == "self":
            continue
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TypeError(f"{name}: *args/**kwargs cannot cross the wire")
        params[pname] = hints.get(pname, Any)
        if param.default is inspect.Parameter.empty:
            required.add(pname)
    return MethodSpec(name, sig, params, frozenset(required), hints.get("return", Any))


async def _ping_signature() -> dict[str, Any]:  # pragma: no cover - signature only
    """The agent's own ``ping``: no parameters, a dict about the agent."""
    return {}


#: Every method an agent serves, by name: the hv driver methods plus ``ping``.
METHODS: dict[str, MethodSpec] = {
    name: _build_spec(name, getattr(BaseHypervisor, name)) for name in REMOTE_METHODS
}
METHODS["ping"] = _build_spec("ping", _ping_signature, {"return": dict[str, Any]})


# --- encoding ------------------------------------------------------------------


def encode_frame(frame: dict[str, Any]) -> bytes:
    """One frame as a line (the version is added here, never forgotten)."""
    return _encoder.encode({"v": PROTOCOL_VERSION, **frame}) + b"\n"


def to_wire(value: Any) -> Any:
    """A Python value (hv Structs, enums, tuples…) as JSON-able builtins."""
    return msgspec.to_builtins(value)


def from_wire(value: Any, type_: Any, *, where: str) -> Any:
    """Decode a JSON value into ``type_``; a mismatch names ``where`` and the path."""
    try:
        return msgspec.convert(value, type_, strict=True)
    except msgspec.ValidationError as err:
        raise ProtocolError(f"{where}: {_path_message(err, where)}") from None


def _path_message(err: msgspec.ValidationError, where: str) -> str:
    # msgspec says "... - at `$.a.b`"; name the path under ``where`` instead of ``$``.
    text = str(err)
    return text.replace("`$", f"`{where}")


def encode_params(method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Bind a call's arguments to ``method``'s parameter names (TypeError if they don't fit)."""
    spec = method_spec(method)
    bound = spec.signature.bind(*((None,) if "self" in spec.signature.parameters else ()), *args, **kwargs)
    return {name: to_wire(value) for name, value in bound.arguments.items() if name != "self"}


def decode_params(method: str, params: Any) -> dict[str, Any]:
    """Validate and decode a request's ``params`` into the method's real types."""
    spec = method_spec(method)
    if not isinstance(params, dict):
        raise ProtocolError(f"'params' of {method} must be an object, got {_json_type(params)}")
    unknown = sorted(set(params) - set(spec.params))
    if unknown:
        raise ProtocolError(
            f"unknown parameter {unknown[0]!r} for method {method!r} (accepted: {', '.join(spec.params) or 'none'})"
        )
    missing = sorted(spec.required - set(params))
    if missing:
        raise ProtocolError(f"missing parameter {missing[0]!r} for method {method!r}")
    return {name: from_wire(value, spec.params[name], where=f"params.{name}") for name, value in params.items()}


def decode_result(method: str, value: Any) -> Any:
    return from_wire(value, method_spec(method).result, where=f"result of {method}")


def method_spec(method: str) -> MethodSpec:
    try:
        return METHODS[method]
    except KeyError:
        raise ProtocolError(f"unknown method {method!r}") from None


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number" if isinstance(value, (int, float)) else type(value).__name__
    )


# --- errors across the wire ------------------------------------------------------


#: Most class names an error frame's ``mro`` may list, and longest name accepted.
MAX_ERROR_MRO = 32
MAX_CLASS_NAME = 256


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def known_error_classes() -> dict[str, type[HypervisorError]]:
    """The hv error classes an error frame may name, by qualified and by bare name.

    Only the public hv tree (:data:`hv.errors.ERROR_CLASSES`): a node cannot
    make the engine instantiate anything else, whatever its frame says.
    """
    known: dict[str, type[HypervisorError]] = {}
    for name, cls in ERROR_CLASSES.items():
        known[name] = cls
        known[_qualified(cls)] = cls
    return known


_KNOWN_ERRORS = known_error_classes()


def error_ancestry(err: HypervisorError) -> list[str]:
    """The qualified names of ``err``'s classes from its own up to HypervisorError (MRO order).

    Kept within what the engine accepts (names over :data:`MAX_CLASS_NAME`
    left out; past :data:`MAX_ERROR_MRO` names, its own class and the ones
    nearest HypervisorError, where the public classes are),
    so that an odd class never turns the driver's error into a protocol error.
    """
    names = [_qualified(cls) for cls in type(err).__mro__ if issubclass(cls, HypervisorError)]
    names = [name for name in names if len(name) <= MAX_CLASS_NAME]
    if len(names) > MAX_ERROR_MRO:
        names = [names[0], *names[-(MAX_ERROR_MRO - 1) :]]
    return names


def error_payload(err: BaseException, *, node: str | None) -> dict[str, Any]:
    """How an exception raised on the node is described in an error frame.

    An hv error also carries ``mro``: its ancestry up to HypervisorError, so
    that the engine rebuilds the nearest class it knows (a driver's own
    subclass arrives as its public ancestor, not as a bare HypervisorError).
    """
    if isinstance(err, HypervisorError):
        return {
            "kind": KIND_HV,
            "class": type(err).__name__[:MAX_CLASS_NAME],
            "mro": error_ancestry(err),
            "message": err.message,
            "node": err.node or node,
        }
    if isinstance(err, ProtocolError):
        return {"kind": KIND_PROTOCOL, "class": "ProtocolError", "message": err.message, "node": node}
    return {"kind": KIND_INTERNAL, "class": type(err).__name__, "message": str(err), "node": node}


def _valid_mro(value: Any) -> bool:
    return (
        isinstance(value, list)
        and 0 < len(value) <= MAX_ERROR_MRO
        and all(isinstance(name, str) and 0 < len(name) <= MAX_CLASS_NAME for name in value)
    )


def error_from_payload(payload: Any, *, node: str, method: str) -> Exception:
    """Rebuild the exception an error frame describes: the nearest known hv class, node set.

    With ``mro`` (this agent's frames) the first class of the list that is
    in :func:`known_error_classes` is built; without it (an older agent) the
    class named by ``class`` if known, else a plain HypervisorError whose
    message names that class. Either way ``remote_type`` is the class the
    node raised, and the message and node are kept.
    """
    if not isinstance(payload, dict) or not isinstance(payload.get("message"), str):
        return ProtocolError(f"malformed error in reply to {method}: {payload!r:.200}", node=node)
    cls_name = payload.get("class")
    message = payload["message"]
    err_node = payload.get("node") if isinstance(payload.get("node"), str) else node
    kind = payload.get("kind")
    if kind == KIND_PROTOCOL:
        return ProtocolError(f"{method}: agent refused the call: {message}", node=err_node)
    if kind == KIND_TIMEOUT:
        return CallTimeout(message, node=err_node)
    if cls_name is not None and (not isinstance(cls_name, str) or not 0 < len(cls_name) <= MAX_CLASS_NAME):
        return ProtocolError(
            f"malformed error in reply to {method}: 'class' must be a class name of at most {MAX_CLASS_NAME} "
            f"characters, got {cls_name!r:.80} (message: {message:.200})",
            node=err_node,
        )
    remote_type = cls_name or "HypervisorError"
    if kind == KIND_HV and "mro" in payload:
        mro = payload["mro"]
        if not _valid_mro(mro):
            return ProtocolError(
                f"malformed error in reply to {method}: 'mro' must be a list of 1..{MAX_ERROR_MRO} class names, "
                f"got {mro!r:.80} (message: {message:.200})",
                node=err_node,
            )
        cls = next((_KNOWN_ERRORS[name] for name in mro if name in _KNOWN_ERRORS), HypervisorError)
        return _remote(cls(message, node=err_node), remote_type)
    cls = _KNOWN_ERRORS.get(cls_name) if kind == KIND_HV and cls_name is not None else None
    if cls is not None:
        return _remote(cls(message, node=err_node), remote_type)
    return _remote(HypervisorError(f"{cls_name}: {message}" if cls_name else message, node=err_node), remote_type)


def _remote(err: HypervisorError, remote_type: str) -> HypervisorError:
    err.remote_type = remote_type  # type: ignore[attr-defined]  # the class the node raised
    return err


# --- framing ---------------------------------------------------------------------


_HEAD_ID = re.compile(rb'^\s*\{\s*"v"\s*:\s*\d+\s*,\s*"id"\s*:\s*(-?\d{1,18}|"[^"\\]{1,128}")')


class Oversized:
    """Marker yielded by :class:`FrameReader` for a frame over the size limit.

    ``head`` keeps the frame's first bytes, so that the id of a frame in our
    own encoding (``{"v":1,"id":…``) can still be answered.
    """

    def __init__(self, size: int, head: bytes = b"") -> None:
        self.size = size
        self.head = head

    @property
    def frame_id(self) -> int | str | None:
        return frame_head_id(self.head)


class FrameReader:
    """Splits a byte stream into lines, refusing (not buffering) oversized ones.

    ``receive`` returns the next chunk, or ``b""`` at end of stream.
    """

    def __init__(self, receive: Callable[[], Awaitable[bytes]], max_frame: int) -> None:
        self._receive = receive
        self._max = max_frame
        self._buf = bytearray()
        self._eof = False
        self._discarding = 0  # bytes dropped so far of an oversized frame
        self._head = b""  # its first bytes

    async def next(self) -> bytes | Oversized | None:
        """The next frame (without its newline), an :class:`Oversized`, or None at EOF."""
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = bytes(self._buf[:nl])
                del self._buf[: nl + 1]
                if self._discarding:
                    size, head = self._discarding + len(line), self._head
                    self._discarding, self._head = 0, b""
                    return Oversized(size, head)
                if len(line) > self._max:
                    return Oversized(len(line), line[:256])
                return line
            if len(self._buf) > self._max:
                if not self._discarding:
                    self._head = bytes(self._buf[:256])
                self._discarding += len(self._buf)
                self._buf.clear()
            if self._eof:
                if self._discarding:
                    size, head = self._discarding + len(self._buf), self._head
                    self._discarding, self._head = 0, b""
                    self._buf.clear()
                    return Oversized(size, head)
                if self._buf:  # a last frame without its newline
                    line = bytes(self._buf)
                    self._buf.clear()
                    return line
                return None
            chunk = await self._receive()
            if not chunk:
                self._eof = True
            else:
                self._buf += chunk


_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(range(256)).translate(None, b"[]{}")
_BRACKET_WEIGHT = bytes.maketrans(b"[]{}", b"\x02\x00\x02\x00")


def nesting_depth(line: bytes) -> int:
    """How deep arrays/objects nest in the JSON text ``line`` (brackets in strings ignored).

    The scan runs in C (regex, translate, accumulate): ~70 ms for 1 MB of brackets.
    """
    brackets = _STRING.sub(b"", line).translate(None, _NOT_BRACKETS).translate(_BRACKET_WEIGHT)
    # An opener weighs 2, a closer 0: the prefix sum minus the position is the depth there.
    return max(map(operator.sub, itertools.accumulate(brackets), itertools.count(1)), default=0)


def frame_head_id(line: bytes) -> int | str | None:
    """The id of a frame in our own encoding (``{"v":1,"id":…``) read from its first bytes.

    Used to answer (or fail the call of) a frame that cannot be decoded whole.
    """
    match = _HEAD_ID.match(line[:256])
    if match is None:
        return None
    raw = match.group(1)
    return raw[1:-1].decode(errors="replace") if raw.startswith(b'"') else int(raw)


def decode_frame(line: bytes) -> dict[str, Any]:
    """Parse one line into a frame object (ProtocolError says why not).

    Nesting deeper than :data:`MAX_NESTING` is refused before decoding, and a
    RecursionError from the decoder is caught as a backstop: no line can crash
    the reader that decodes it.
    """
    # Fewer openers than the bound cannot nest deeper than it: no scan needed.
    openers = line.count(b"[") + line.count(b"{")
    depth = nesting_depth(line) if openers > MAX_NESTING else 0
    if depth > MAX_NESTING:
        raise ProtocolError(f"frame nests arrays/objects deeper than {MAX_NESTING} levels ({depth}): {line[:40]!r}")
    try:
        frame = _decoder.decode(line)
    except msgspec.DecodeError as err:
        raise ProtocolError(f"frame is not valid JSON ({err}): {line[:80]!r}") from None
    except RecursionError:
        raise ProtocolError(f"frame nests arrays/objects deeper than {MAX_NESTING} levels: {line[:40]!r}") from None
    if not isinstance(frame, dict):
        raise ProtocolError(f"frame must be a JSON object, got {_json_type(frame)}")
    return frame


def check_version(frame: dict[str, Any]) -> None:
    if "v" not in frame:
        raise ProtocolError(f"frame has no protocol version 'v' (this side speaks v={PROTOCOL_VERSION})")
    version = frame["v"]
    if version != PROTOCOL_VERSION or isinstance(version, bool):
        raise ProtocolError(f"protocol version mismatch: frame has v={version!r}, this side speaks v={PROTOCOL_VERSION}")


def valid_id(value: Any) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, str) and 0 < len(value) <= 128)


__all__ = [
    "MAX_REPLY_FRAME",
    "MAX_NESTING",
    "MAX_REQUEST_FRAME",
    "METHODS",
    "PROTOCOL_VERSION",
    "FrameReader",
    "MethodSpec",
    "Oversized",
    "check_version",
    "decode_frame",
    "decode_params",
    "decode_result",
    "encode_frame",
    "encode_params",
    "frame_head_id",
    "error_ancestry",
    "error_from_payload",
    "error_payload",
    "known_error_classes",
    "from_wire",
    "method_spec",
    "nesting_depth",
    "to_wire",
    "valid_id",
]
