"""Capture one stream of a command: keep its head and tail, drop the middle, stop at a sentinel.

The persistent shell ends every command with a random token on stdout and on stderr. A capture feeds on
raw chunks as they arrive, finds the token even when it is split across chunks, and never holds more than
`cap` bytes of output however much the command prints (endless output costs reading time, not memory).
"""
from __future__ import annotations

DEFAULT_OUTPUT_CAP = 16_384  # bytes per stream; mini-swe-agent's 10k chars is the anchor


class StreamCapture:
    """Bytes of one stream up to the line that starts with `token`; the text after the token is `trailer`."""

    def __init__(self, token: bytes, cap: int = DEFAULT_OUTPUT_CAP):
        if cap < 2:
            raise ValueError(f"output cap must be at least 2 bytes, got {cap}")
        self.token = token
        self.head_cap = cap // 2
        self.tail_cap = cap - self.head_cap
        self.head = bytearray()
        self.tail = bytearray()  # may grow to 2 * tail_cap before it is trimmed (amortised O(1) per byte)
        self.total = 0  # bytes of output seen, kept or not
        self.trailer: bytes | None = None  # set once the sentinel line is complete
        self._pending = bytearray()  # bytes that may still be the start of the token

    @property
    def done(self) -> bool:
        return self.trailer is not None

    def feed(self, data: bytes) -> None:
        if self.done:
            return  # output of background jobs after the sentinel belongs to no command
        self._pending += data
        at = self._pending.find(self.token)
        if at >= 0:
            end = self._pending.find(b"\n", at)
            if end < 0:
                return  # the rest of the sentinel line is still in flight
            self._keep(self._pending[:at])
            self.trailer = bytes(self._pending[at + len(self.token):end])
            self._pending.clear()
            return
        hold = len(self.token) - 1  # a token split across chunks starts within the last len-1 bytes
        if len(self._pending) > hold:
            self._keep(self._pending[: len(self._pending) - hold])
            del self._pending[: len(self._pending) - hold]

    def _keep(self, data: bytes | bytearray) -> None:
        self.total += len(data)
        room = self.head_cap - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            if len(self.tail) > 2 * self.tail_cap:
                del self.tail[: len(self.tail) - self.tail_cap]

    @property
    def truncated(self) -> bool:
        return self.total > self.head_cap + self.tail_cap

    def text(self) -> str:
        """The captured output; when cut, the elision is stated where the middle was."""
        if not self.truncated:
            return (bytes(self.head) + bytes(self.tail)).decode("utf-8", errors="replace")
        tail = bytes(self.tail[-self.tail_cap:])
        elided = self.total - len(self.head) - len(tail)
        note = (
            f"\n[... {elided} bytes elided: the output was {self.total} bytes, shown are the first "
            f"{len(self.head)} and the last {len(tail)}; redirect it to a file and read the part you need ...]\n"
        )
        return bytes(self.head).decode("utf-8", errors="replace") + note + tail.decode("utf-8", errors="replace")
