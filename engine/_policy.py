"""The live-migration convergence policy: when to raise the downtime, when to give up.

A migration that never converges (Ganeti #950: "endless copying memory",
progress past 600 %) is a policy problem, not a driver one. The engine reads
the migration's status (long-polled), and :class:`Convergence` turns each
reading into at most one :class:`Decision`, always with its reason:

* remaining RAM has not reached a new low for ``stall_window`` s → raise the
  allowed downtime by ``downtime_step_ms``, up to ``downtime_max_ms``;
* still stalled at the cap → with ``auto_converge`` keep going until the
  completion timeout (the hypervisor's own auto-converge throttles the
  guest: kvm's ``migration_caps=auto-converge``); without it, act now;
* the completion timeout (``timeout_per_gib`` × RAM in GiB, Nova's 800 s,
  at least ``min_timeout``) → the ``on_timeout`` action: ``abort`` (default)
  or ``force-complete`` (pause the guest so the copy finishes); a forced
  migration that still has not finished after ``force_grace`` s is aborted.

It is pure: time comes in as an argument, so it runs on any clock.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from .errors import InvalidOperation, shorten

GIB = 1024**3
#: The largest allowed downtime a policy may set or reach (ms): 10 minutes.
MAX_DOWNTIME_MS = 600_000


class TimeoutAction(str, enum.Enum):
    """What to do when a migration runs out of time."""

    ABORT = "abort"
    FORCE_COMPLETE = "force-complete"


class MigrationPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Every knob of the convergence policy, with the cluster default.

    An operation overrides some with ``Migrate(policy={"on_timeout": "force-complete"})``.
    """

    timeout_per_gib: float = 800.0  # completion timeout, seconds per GiB of guest RAM (Nova)
    min_timeout: float = 60.0  # the completion timeout is never shorter
    stall_window: float = 5.0  # seconds without a new low of remaining RAM = stalled
    stall_min_progress: float = 0.02  # a new low must beat the best by this fraction of RAM
    downtime_start_ms: int | None = None  # set at the start; None: the instance's own
    downtime_step_ms: int = 200  # each raise adds this
    downtime_max_ms: int = 2000  # never above this
    auto_converge: bool = False  # at the cap: keep going until the timeout (hypervisor throttles)
    on_timeout: TimeoutAction = TimeoutAction.ABORT
    force_grace: float = 60.0  # after force-complete: abort if still not done
    status_wait: float = 1.0  # longest wait of one status long-poll (progress at least this often)
    progress_interval: float = 0.5  # at most one progress event per this many seconds
    status_failures: int = 3  # consecutive failed status reads tolerated, then abort
    status_timeout: float = 10.0  # one status read, beyond its wait

    def validate(self, where: str = "policy") -> MigrationPolicy:
        """Range checks; raise :class:`InvalidOperation` naming the knob and value."""

        from ._ops import MAX_SECONDS, check_seconds

        for name in ("timeout_per_gib", "min_timeout", "stall_window", "force_grace", "status_timeout"):
            check_seconds(where, name, getattr(self, name), zero=False, maximum=MAX_SECONDS)
        check_seconds(where, "status_wait", self.status_wait, zero=False, maximum=5.0)  # progress is shown at least this often
        check_seconds(where, "progress_interval", self.progress_interval, maximum=MAX_SECONDS)
        if isinstance(self.stall_min_progress, bool) or not 0 <= self.stall_min_progress < 1:
            raise InvalidOperation(f"{where}: stall_min_progress must be a fraction with 0 <= stall_min_progress < 1, not {shorten(self.stall_min_progress)}")
        for name in ("downtime_step_ms", "downtime_max_ms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_DOWNTIME_MS:
                raise InvalidOperation(f"{where}: {name} must be an integer with 1 <= {name} <= {MAX_DOWNTIME_MS} (ms), not {shorten(value)}")
        if self.downtime_start_ms is not None and (
            isinstance(self.downtime_start_ms, bool) or not 1 <= self.downtime_start_ms <= self.downtime_max_ms
        ):
            raise InvalidOperation(
                f"{where}: downtime_start_ms must be an integer in 1..downtime_max_ms ({self.downtime_max_ms}), not {shorten(self.downtime_start_ms)}"
            )
        if isinstance(self.status_failures, bool) or not isinstance(self.status_failures, int) or not 0 <= self.status_failures <= 100:
            raise InvalidOperation(f"{where}: status_failures must be an integer in 0..100, not {shorten(self.status_failures)}")
        return self

    def completion_timeout(self, ram_bytes: int) -> float:
        """Seconds a migration of ``ram_bytes`` of RAM may take."""
        return max(self.min_timeout, self.timeout_per_gib * max(0, ram_bytes) / GIB)

    def with_overrides(self, overrides: Mapping[str, Any], where: str = "policy") -> MigrationPolicy:
        """This policy with ``overrides`` applied (unknown knobs and bad values refused)."""
        unknown = sorted(set(overrides) - set(self.__struct_fields__))
        if unknown:
            raise InvalidOperation(f"{where}: unknown knob {shorten(unknown[0])} (known: {', '.join(self.__struct_fields__)})")
        try:
            merged = msgspec.convert({**msgspec.to_builtins(self), **overrides}, MigrationPolicy)
        except msgspec.ValidationError as err:
            raise InvalidOperation(f"{where}: {err}") from err
        return merged.validate(where)


#: The cluster default (an engine may carry its own as ``engine.migration_policy``).
DEFAULT_POLICY = MigrationPolicy()


class Action(str, enum.Enum):
    RAISE_DOWNTIME = "raise-downtime"
    AUTO_CONVERGE = "auto-converge"
    FORCE_COMPLETE = "force-complete"
    ABORT = "abort"


@dataclass(frozen=True)
class Decision:
    """One policy decision, with the reason it was taken."""

    action: Action
    reason: str
    downtime_ms: int | None = None

    def as_event(self) -> dict[str, Any]:
        data: dict[str, Any] = {"action": self.action.value, "reason": self.reason}
        if self.downtime_ms is not None:
            data["downtime_ms"] = self.downtime_ms
        return data


@dataclass
class Convergence:
    """Turns status readings into decisions (pure; ``now`` is passed in)."""

    policy: MigrationPolicy
    ram_total: int
    started: float
    downtime_ms: int
    timeout: float = 0.0
    best_remaining: int | None = None
    last_progress: float = 0.0
    at_cap: bool = False
    auto_converging: bool = False
    forced_at: float | None = None
    aborted: bool = False
    decisions: list[Decision] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.timeout = self.policy.completion_timeout(self.ram_total)
        self.last_progress = self.started
        self.at_cap = self.downtime_ms >= self.policy.downtime_max_ms

    def downtime_unsupported(self) -> None:
        """The driver cannot change the downtime: behave as if at the cap."""
        self.at_cap = True

    def observe(self, now: float, remaining: int, ram_total: int | None = None) -> Decision | None:
        """One reading of remaining RAM (bytes) at ``now``; a decision, or None."""
        if self.aborted:
            return None
        if ram_total and ram_total != self.ram_total:
            self.ram_total = ram_total
            self.timeout = self.policy.completion_timeout(ram_total)
        elapsed = now - self.started
        margin = self.policy.stall_min_progress * max(self.ram_total, 1)
        if self.best_remaining is None or remaining < self.best_remaining - margin or remaining == 0:
            self.best_remaining = remaining
            self.last_progress = now
        if self.forced_at is not None:
            if now - self.forced_at >= self.policy.force_grace:
                return self._decide(Action.ABORT, f"force-complete did not finish the migration within {self.policy.force_grace:g}s")
            return None
        if elapsed >= self.timeout:
            gib = self.ram_total / GIB
            why = (
                f"completion timeout of {self.timeout:g}s reached "
                f"({self.policy.timeout_per_gib:g}s/GiB × {gib:.2f} GiB, at least {self.policy.min_timeout:g}s)"
            )
            return self._timeout_action(now, why)
        stalled_for = now - self.last_progress
        if stalled_for < self.policy.stall_window:
            return None
        left = f"{remaining / 2**20:.1f} MiB"
        if not self.at_cap:
            new = min(self.policy.downtime_max_ms, self.downtime_ms + self.policy.downtime_step_ms)
            self.downtime_ms = new
            self.at_cap = new >= self.policy.downtime_max_ms
            self.last_progress = now
            return self._decide(
                Action.RAISE_DOWNTIME,
                f"remaining RAM ({left}) has not fallen for {stalled_for:.1f}s; allowed downtime raised to {new} ms"
                + (" (the cap)" if self.at_cap else ""),
                downtime_ms=new,
            )
        if self.policy.auto_converge:
            if not self.auto_converging:
                self.auto_converging = True
                return self._decide(
                    Action.AUTO_CONVERGE,
                    f"still stalled ({left} left) at the downtime cap of {self.downtime_ms} ms; "
                    f"letting the hypervisor throttle the guest until the completion timeout ({self.timeout - elapsed:.0f}s left)",
                )
            return None
        return self._timeout_action(
            now, f"remaining RAM ({left}) has not fallen for {stalled_for:.1f}s at the downtime cap of {self.downtime_ms} ms"
        )

    def _timeout_action(self, now: float, why: str) -> Decision:
        if TimeoutAction(self.policy.on_timeout) is TimeoutAction.FORCE_COMPLETE:
            self.forced_at = now
            return self._decide(Action.FORCE_COMPLETE, f"{why}: pausing the guest so the migration completes")
        return self._decide(Action.ABORT, f"{why}: aborting (on_timeout=abort)")

    def _decide(self, action: Action, reason: str, downtime_ms: int | None = None) -> Decision:
        if action is Action.ABORT:
            self.aborted = True
        decision = Decision(action, reason, downtime_ms)
        self.decisions.append(decision)
        return decision
