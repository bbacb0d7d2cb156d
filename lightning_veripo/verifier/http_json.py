"""How `OpenAIJudge` talks to its server: one HTTP request whose whole answer must arrive within a deadline,
retried with exponential backoff where a retry can help (5xx, 429, timeouts, connection errors)."""

from __future__ import annotations

import http.client
import time
import urllib.error
import urllib.request
from collections.abc import Callable

NETWORK_ERRORS = (urllib.error.URLError, OSError, http.client.HTTPException)


def read_within(request: urllib.request.Request, timeout_s: float) -> bytes:
    """The body of the answer to `request`; TimeoutError unless all of it arrives within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    with urllib.request.urlopen(request, timeout=timeout_s) as resp:
        # The socket timeout bounds each wait only: a server that trickles its answer a byte at a time
        # would hold the judge forever, so the whole answer must also arrive within timeout_s.
        chunks = []
        while chunk := resp.read1(1 << 16):
            chunks.append(chunk)
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out: the answer took longer than timeout_s={timeout_s}")
        return b"".join(chunks)


def with_retries(send: Callable[[], bytes], max_retries: int, backoff_s: float) -> bytes:
    """`send()`, tried again after backoff_s, 2·backoff_s, ... on a 5xx or 429 answer or a network error; a
    client error (4xx) or the last attempt's error raises."""
    for attempt in range(max_retries + 1):
        try:
            return send()
        except urllib.error.HTTPError as err:
            if (err.code < 500 and err.code != 429) or attempt == max_retries:
                raise
        except NETWORK_ERRORS:
            if attempt == max_retries:
                raise
        time.sleep(backoff_s * 2**attempt)
    raise AssertionError("unreachable")
