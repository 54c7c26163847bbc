"""Retries of Hub calls on transient failures (429, 5xx, dropped connections), with exponential backoff."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}


def retry_delay(exc: Exception, attempt: int, backoff_s: float) -> float | None:
    """Seconds to wait before retrying ``exc``, or None when it is permanent."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        if status not in TRANSIENT_STATUS:
            return None
        header = exc.response.headers.get("Retry-After") if exc.response is not None else None
        if header is not None and header.strip().isdigit():
            return max(float(header), backoff_s * 2**attempt)
        return backoff_s * 2**attempt
    if isinstance(exc, httpx2.TransportError):
        return backoff_s * 2**attempt
    return None


def describe_error(exc: Exception) -> str:
    """A one-line description of a Hub failure (status and server message; never request headers)."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        server = (exc.server_message or "").strip().splitlines()
        return f"HTTP {exc.response.status_code}" + (f": {server[0][:200]}" if server else "")
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


def call_with_retries(call: Callable[[], T], retries: int = 5, backoff_s: float = 1.0) -> T:
    """``call()``, retried after transient failures; a permanent failure, or the last one, is raised as is."""
    attempt = 0
    while True:
        try:
            return call()
        except Exception as exc:
            wait = retry_delay(exc, attempt, backoff_s)
            if wait is None or attempt >= retries:
                raise
        time.sleep(wait)
        attempt += 1
