"""Resident sessions, found again by the token ids of the next request.

An agent framework re-sends the whole conversation every turn. The pool keeps the token ids of every
idle session in a radix tree (`dsv4.runtime.prefix.PrefixTree`) and takes the session that lets the
new prompt reuse the most KV:
  * its tokens are all a prefix of the prompt: it is extended, only the new suffix is prefilled;
  * the prompt leaves it part-way (a re-rendered history, an edit, a retry): the session is rolled
    back to the newest roll-back point at or before the shared prefix (`Session.truncate`; the
    engine keeps one at every generate start and after the last message boundary of every append,
    so a chat whose history is re-rendered from the last assistant turn on keeps all before it).
    It is forked first while the pool has room, so the original stays for its own client; with the
    pool full it is rolled back in place;
  * nothing is reusable: a new session.
Only sessions made under the request's `cache_salt` (or, without one, under none) are candidates
(one tree per salt), so one client's cached prefixes are never reused, nor their reuse timed, by a
client with another salt. A session serving a request is out of the tree until the request ends
(`release`), so concurrent requests never share one. Idle sessions beyond `max_sessions` are closed, least recently used first;
when the engine's KV budget is full its scheduler spills idle ones to host memory by itself (they
come back on reuse).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import anyio

from dsv4.runtime.prefix import PrefixTree


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
        self.trees: dict[str | None, PrefixTree] = {}  # cache_salt -> its idle sessions' token ids
        self.salts: dict[Any, str | None] = {}  # session -> the cache_salt it was made under
        self.idle: OrderedDict[Any, None] = OrderedDict()  # least recently used first
        self.busy: set[Any] = set()
        # idle, but the engine still ends their cancelled request (cutting the tokens the client never
        # got): they join their tree at the next checkout that finds them settled
        self.settling: set[Any] = set()
        self._lock = anyio.Lock()  # one checkout at a time: two must not fork one session at once

    @property
    def sessions(self) -> list[Any]:
        """Every pooled session, idle ones least recently used first, then those serving requests."""
        return [*self.idle, *self.busy]

    async def checkout(self, prompt: Sequence[int], salt: str | None = None) -> Checkout:
        async with self._lock:
            self._settle()
            session, shared = self._best(prompt, salt)
            if session is None:
                found = Checkout(await anyio.to_thread.run_sync(self.engine.new_session), "new", 0)
            elif shared == len(session):
                self._take(session)
                found = Checkout(session, "extend", shared)
            elif len(self.idle) + len(self.busy) < self.max_sessions:
                child = await anyio.to_thread.run_sync(session.fork)
                await anyio.to_thread.run_sync(child.truncate, shared)
                self.idle.move_to_end(session)
                found = Checkout(child, "fork", shared)
            else:
                self._take(session)
                await anyio.to_thread.run_sync(session.truncate, shared)
                found = Checkout(session, "truncate", shared)
            self.busy.add(found.session)
            self.salts[found.session] = salt
            self._evict()
            return found

    def _best(self, prompt: Sequence[int], salt: str | None) -> tuple[Any, int]:
        """(session, shared prefix) of the idle session under `salt` whose KV the prompt reuses most,
        or (None, 0) when none reuses anything."""
        tree = self.trees.get(salt)
        if tree is None:
            return None, 0
        _, candidates = tree.match(prompt)
        best, best_key = (None, 0), (0, False)
        for session, shared in candidates:
            reuse = session.reusable(shared)
            key = (reuse, shared == len(session))  # at equal reuse, extending beats forking
            if reuse and key > best_key:
                best, best_key = (session, shared), key
        return best

    def _take(self, session: Any) -> None:
        if session in self.settling:
            self.settling.discard(session)
        else:
            self.trees[self.salts[session]].remove(session)
        del self.idle[session]

    def _settle(self) -> None:
        for session in [s for s in self.settling if not s.busy]:
            self.settling.discard(session)
            self.trees.setdefault(self.salts[session], PrefixTree()).insert(session, session.tokens)

    def release(self, session: Any) -> None:
        """The request on `session` ended: it goes back to the tree, most recently used, once the
        engine is done with it (a session left empty, as when its first prefill was refused, is
        closed). Synchronous, so it runs even in a cancelled request's clean-up."""
        self.busy.discard(session)
        try:
            tokens = session.tokens
        except Exception:  # noqa: BLE001 - closed meanwhile (evicted, engine shut down)
            self.salts.pop(session, None)
            return
        if not tokens:
            self.salts.pop(session)
            session.close()
            return
        self.settling.add(session)
        self.idle[session] = None
        self._settle()
        self._evict()

    def _evict(self) -> None:
        while len(self.idle) + len(self.busy) > self.max_sessions and self.idle:
            session = next(iter(self.idle))
            self._take(session)
            del self.salts[session]
            session.close()

    def close(self) -> None:
        for session in self.sessions:
            session.close()
        self.idle.clear()
        self.busy.clear()
        self.settling.clear()
        self.trees, self.salts = {}, {}
