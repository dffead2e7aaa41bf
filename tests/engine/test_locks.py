"""Property test: whatever the order of requests, held locks never conflict."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from engine._locks import LockManager, LockRequest

requests = st.lists(
    st.builds(LockRequest, level=st.sampled_from(["node", "instance"]), name=st.sampled_from(["a", "b", "c"]), exclusive=st.booleans()),
    min_size=1,
    max_size=4,
)
actions = st.lists(st.tuples(st.integers(0, 5), st.one_of(st.none(), requests)), max_size=40)


@settings(max_examples=200, deadline=None)
@given(actions)
def test_held_locks_never_conflict(script: list[tuple[int, list[LockRequest] | None]]) -> None:
    locks = LockManager()
    held: dict[int, list[LockRequest]] = {}
    for owner, reqs in script:
        if reqs is None or owner in held:
            locks.release_all(owner)
            held.pop(owner, None)
            continue
        if locks.try_acquire(owner, reqs):
            held[owner] = reqs
        else:
            assert locks.held_by(owner) == []  # all or nothing
        for a, ra in held.items():
            for b, rb in held.items():
                if a >= b:
                    continue
                for x in ra:
                    for y in rb:
                        if (x.level, x.name) == (y.level, y.name):
                            assert not (x.exclusive or y.exclusive), (a, x, b, y)
