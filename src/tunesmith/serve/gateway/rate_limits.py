"""Per-key limits on requests and tokens per minute, over sliding 60-second windows kept in memory."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from tunesmith.errors import TunesmithError
from tunesmith.serve.gateway.keys import ApiKey

WINDOW_SECONDS = 60.0


class RateLimited(TunesmithError):
    """A request over its key's limit; `retry_after` (seconds, >= 1) says when one like it fits again."""

    def __init__(self, message: str, retry_after: int, limit: Literal["requests", "tokens"]):
        super().__init__(message)
        self.retry_after = retry_after
        self.limit = limit


@dataclass
class _Window:
    """One key's admitted requests and counted tokens in the last minute, oldest first."""

    requests: deque[float] = field(default_factory=deque)
    tokens: deque[tuple[float, int]] = field(default_factory=deque)
    token_total: int = 0

    def prune(self, cutoff: float) -> None:
        while self.requests and self.requests[0] <= cutoff:
            self.requests.popleft()
        while self.tokens and self.tokens[0][0] <= cutoff:
            self.token_total -= self.tokens.popleft()[1]

    def seconds_until_tokens_fit(self, needed: int, limit: int, now: float) -> float:
        """How long until enough counted tokens leave the window for `needed` more to fit under `limit`."""
        remaining = self.token_total
        for when, count in self.tokens:
            remaining -= count
            if remaining + needed <= limit:
                return when + WINDOW_SECONDS - now
        return WINDOW_SECONDS


def _whole_seconds(seconds: float) -> int:
    return max(1, math.ceil(seconds))


class RateLimiter:
    """Admits or refuses each request by its key's `rpm` and `tpm`; keys without limits cost nothing."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: dict[str, _Window] = {}
        self._swept_at = clock()

    def admit(self, key: ApiKey, prompt_tokens: int) -> None:
        """Count a request and its prompt tokens, or raise RateLimited (and count nothing) when over a limit."""
        if key.rpm is None and key.tpm is None:
            return
        with self._lock:
            now = self._clock()
            window = self._window(key.key_id, now)
            if key.rpm is not None and len(window.requests) >= key.rpm:
                retry = _whole_seconds(window.requests[0] + WINDOW_SECONDS - now)
                raise RateLimited(f"key {key.name}: {key.rpm} requests per minute used; retry in {retry} s",
                                  retry, "requests")
            if key.tpm is not None:
                self._check_tokens(key, window, prompt_tokens, now)
                window.tokens.append((now, prompt_tokens))
                window.token_total += prompt_tokens
            if key.rpm is not None:
                window.requests.append(now)

    @staticmethod
    def _check_tokens(key: ApiKey, window: _Window, prompt_tokens: int, now: float) -> None:
        if prompt_tokens > key.tpm:
            raise RateLimited(f"key {key.name}: this request's {prompt_tokens} prompt tokens exceed the key's "
                              f"{key.tpm} tokens per minute; shorten the prompt or use a key with a higher --tpm",
                              int(WINDOW_SECONDS), "tokens")
        if window.token_total + prompt_tokens > key.tpm:
            retry = _whole_seconds(window.seconds_until_tokens_fit(prompt_tokens, key.tpm, now))
            raise RateLimited(f"key {key.name}: {window.token_total} of {key.tpm} tokens per minute used, this "
                              f"request needs {prompt_tokens}; retry in {retry} s", retry, "tokens")

    def spend(self, key: ApiKey, completion_tokens: int) -> None:
        """Count a finished request's completion tokens against the key's `tpm` (they may push it over)."""
        if key.tpm is None or completion_tokens <= 0:
            return
        with self._lock:
            now = self._clock()
            window = self._window(key.key_id, now)
            window.tokens.append((now, completion_tokens))
            window.token_total += completion_tokens

    def _window(self, key_id: str, now: float) -> _Window:
        """The key's window with expired entries dropped; once a minute, keys idle for a minute are forgotten."""
        cutoff = now - WINDOW_SECONDS
        if now - self._swept_at >= WINDOW_SECONDS:
            self._forget_idle_keys(cutoff)
            self._swept_at = now
        window = self._windows.setdefault(key_id, _Window())
        window.prune(cutoff)
        return window

    def _forget_idle_keys(self, cutoff: float) -> None:
        for key_id in list(self._windows):
            window = self._windows[key_id]
            window.prune(cutoff)
            if not window.requests and not window.tokens:
                del self._windows[key_id]
