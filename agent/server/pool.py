"""Resident sessions, found again by the token ids of the next request.

An agent framework re-sends the whole conversation every turn. The pool finds the resident session
sharing the longest token-id prefix with the new prompt:
  * its tokens are all a prefix of the prompt: it is extended, only the new suffix is prefilled;
  * the prompt leaves it part-way (an edited or re-rendered history, a retry): the session is rolled
    back to the shared prefix (`Session.truncate`: back to the newest snapshot at or before it; every
    generate start is a snapshot, so the end of any earlier prompt is one). It is forked first while
    the pool has room, so the original stays for its own client; with the pool full it is truncated
    in place;
  * nothing is shared: a new session.
Only sessions made under the request's `cache_salt` (or, without one, under none) are candidates,
so one client's cached prefixes are never reused, nor their reuse timed, by a client with another
salt. Sessions are evicted least recently used first, past `max_sessions` or when the engine's KV budget
refuses a prefill or a decode start. The caller serialises calls (the server holds one lock for
all engine work).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


def shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id sequences."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass
class Checkout:
    """A session ready to take `prompt`: its tokens are a prefix of it."""

    session: Any  # dsv4.Session
    how: str  # "new" | "extend" | "fork" | "truncate"
    shared: int  # prompt tokens the session already held


class SessionPool:
    def __init__(self, engine: Any, max_sessions: int = 8) -> None:
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        self.engine = engine
        self.max_sessions = max_sessions
        self.sessions: list[Any] = []  # least recently used first
        self.salts: dict[int, str | None] = {}  # id(session) -> the cache_salt it was made under

    def checkout(self, prompt: Sequence[int], salt: str | None = None) -> Checkout:
        best, shared = None, 0
        for session in self.sessions:
            if self.salts[id(session)] != salt:
                continue
            n = shared_prefix(session.tokens, prompt)
            if n > shared:
                best, shared = session, n
        if best is None:
            found = Checkout(self.engine.new_session(), "new", 0)
        elif shared == len(best):
            found = Checkout(best, "extend", shared)
        else:
            room = len(self.sessions) < self.max_sessions
            session = best.fork() if room else best
            session.truncate(shared)
            found = Checkout(session, "fork" if room else "truncate", shared)
        if found.session in self.sessions:
            self.sessions.remove(found.session)
        self.sessions.append(found.session)
        self.salts[id(found.session)] = salt
        while len(self.sessions) > self.max_sessions:
            self.evict_one(keep=found.session)
        return found

    def evict_one(self, keep: Any) -> bool:
        """Close the least recently used session other than `keep`; False when there is none."""
        for session in self.sessions:
            if session is not keep:
                self.drop(session)
                return True
        return False

    def drop(self, session: Any) -> None:
        if session in self.sessions:
            self.sessions.remove(session)
            del self.salts[id(session)]
        session.close()

    def close(self) -> None:
        for session in self.sessions:
            session.close()
        self.sessions, self.salts = [], {}
