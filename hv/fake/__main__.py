"""Change or read a fake node's settings from a shell (e.g. over SSH in chaos runs).

    python -m hv.fake configure STATE_DIR bandwidth=67108864 soft_stop_delay=null
    python -m hv.fake configure STATE_DIR 'faults={"migrate_instance": {"error": "boom", "times": 1}}'
    python -m hv.fake settings STATE_DIR
    python -m hv.fake events STATE_DIR

A VALUE is JSON when it parses as JSON, else a string (string settings such
as ``hv_version`` always take it as text). Exit status 2 on a
bad setting, with the error on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import msgspec

from ..errors import HypervisorError
from ._config import Settings
from ._driver import FakeHypervisor


def _parse(items: Sequence[str]) -> dict[str, Any]:
    """KEY=VALUE pairs; a string setting (``hv_version=2.0``) keeps VALUE as text."""
    text_fields = {f.name for f in msgspec.structs.fields(Settings) if f.type is str}
    settings: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.isidentifier():
            raise HypervisorError(f"setting must be KEY=VALUE with KEY an identifier, got {item!r}")
        if key in text_fields:
            settings[key] = raw
            continue
        try:
            settings[key] = json.loads(raw)
        except ValueError:
            settings[key] = raw
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hv.fake", description="Configure or inspect a fake hypervisor node.")
    sub = parser.add_subparsers(dest="command", required=True)
    conf = sub.add_parser("configure", help="merge KEY=VALUE settings into STATE_DIR/config.json")
    conf.add_argument("state_dir")
    conf.add_argument("settings", nargs="+", metavar="KEY=VALUE")
    show = sub.add_parser("settings", help="print the node's settings as JSON")
    show.add_argument("state_dir")
    events = sub.add_parser("events", help="print the node's journal, one JSON object a line")
    events.add_argument("state_dir")
    args = parser.parse_args(argv)
    try:
        if args.command == "configure":
            result = FakeHypervisor.configure(args.state_dir, **_parse(args.settings))
            print(msgspec.json.encode(result).decode())
        elif args.command == "settings":
            print(msgspec.json.encode(FakeHypervisor.read_settings(args.state_dir)).decode())
        else:
            for event in FakeHypervisor.read_events(args.state_dir):
                print(json.dumps(event))
    except HypervisorError as err:
        print(f"python -m hv.fake {args.command}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
