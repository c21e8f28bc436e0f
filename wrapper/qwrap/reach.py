"""Whether the Hugging Face Hub answers: asked at most once per process, within ``PROBE_S``,
before any plan is built, so that `plan`, `run` and every `--step` job decide about the default
texts (WikiText-2) from a quick answer instead of from a failed download. huggingface_hub itself
retries an unreachable host five times with backoff (about 23 s) and logs every retry.

``HF_HUB_OFFLINE=1`` answers without asking. Otherwise one HTTP HEAD goes to the endpoint
(``HF_ENDPOINT`` honoured, proxies from the environment as huggingface_hub's httpx client uses
them). It runs in a daemon thread because a name lookup has no timeout of its own: no answer
within ``PROBE_S`` counts as unreachable. Any HTTP answer below 500 counts as reachable. No
process is started.
"""

from __future__ import annotations

import functools
import threading
import time
from dataclasses import dataclass

PROBE_S = 2.0


@dataclass(frozen=True)
class Reach:
    endpoint: str
    problem: str  # why the Hub cannot be used, for a message; "" when it answered
    seconds: float  # how long finding out took

    @property
    def ok(self) -> bool:
        return not self.problem

    def describe(self) -> str:
        """``problem`` as a clause: "HF_HUB_OFFLINE is set", "https://huggingface.co is unreachable (...)"."""
        if self.ok or self.problem == OFFLINE:
            return self.problem
        return f"{self.endpoint} is unreachable ({self.problem})"


OFFLINE = "HF_HUB_OFFLINE is set"


@functools.cache
def hub() -> Reach:
    """The answer for this process's endpoint, asked once."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return Reach(constants.ENDPOINT, OFFLINE, 0.0)
    return probe(constants.ENDPOINT)


def probe(endpoint: str, timeout: float = PROBE_S) -> Reach:
    started = time.monotonic()
    answer: list[str] = []
    thread = threading.Thread(target=lambda: answer.append(_ask(endpoint, timeout)), daemon=True,
                              name="qwrap-hub-probe")
    thread.start()
    thread.join(timeout + 0.5)  # the client's own timeout covers connect and read, not the name lookup
    problem = answer[0] if answer else f"no answer within {timeout:g} s"
    return Reach(endpoint, problem, time.monotonic() - started)


def _ask(endpoint: str, timeout: float) -> str:
    import httpx

    try:
        with httpx.Client(timeout=timeout, follow_redirects=False) as client:
            status = client.head(endpoint).status_code
    except (httpx.HTTPError, httpx.InvalidURL, OSError, ValueError) as exc:
        return _reason(exc)
    return f"it answered HTTP {status}" if status >= 500 else ""


def _reason(exc: BaseException) -> str:
    """The innermost message ("[Errno -2] Name or service not known", "[Errno 111] Connection refused")."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        inner = exc.__cause__ or exc.__context__
        if inner is None or not str(inner):
            break
        exc = inner
    return str(exc) or type(exc).__name__
