"""Token accounting for chat backends: prompt and completion tokens used so far, and an
optional budget that stops a long explain run before it spends more (a bound on its cost)."""

from __future__ import annotations

import threading

from app.errors import SaescopeError


class TokenBudgetExceeded(SaescopeError):
    """The run has used the tokens it was allowed; the work done so far is kept."""


class TokenUsage:
    """Counters shared by the threads of one backend. ``max_total_tokens`` (None: no bound) is
    checked before each request, so concurrent requests may pass it by what they use."""

    def __init__(self, max_total_tokens: int | None = None) -> None:
        if max_total_tokens is not None and max_total_tokens < 1:
            raise ValueError("max_total_tokens must be at least 1")
        self.max_total_tokens = max_total_tokens
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.requests = 0
        self._lock = threading.Lock()

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def check(self) -> None:
        """TokenBudgetExceeded once the budget is used up."""
        with self._lock:
            used = self.prompt_tokens + self.completion_tokens
        if self.max_total_tokens is not None and used >= self.max_total_tokens:
            raise TokenBudgetExceeded(
                f"the token budget is used up: {used:,} of {self.max_total_tokens:,} tokens "
                f"in {self.requests} requests")  # the caller says how to go on

    def add(self, *, prompt_tokens: int, completion_tokens: int) -> None:
        with self._lock:
            self.prompt_tokens += max(0, int(prompt_tokens))
            self.completion_tokens += max(0, int(completion_tokens))
            self.requests += 1

    def __repr__(self) -> str:
        return (f"TokenUsage(prompt={self.prompt_tokens}, completion={self.completion_tokens}, "
                f"requests={self.requests}, max_total={self.max_total_tokens})")
