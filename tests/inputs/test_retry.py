"""The retry policy of Hub calls, in process: which failures are retried, how long it waits, what it reports."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import hf_raise_for_status

from rqvae_ray.inputs import retry
from rqvae_ray.inputs.retry import call_with_retries, describe_error, retry_delay
from tests.hub_server import HubServer

pytestmark = pytest.mark.timeout(60)

SENTINEL = "hf_SENTINEL_retry_0123456789abcdefSECRET"
URL = "http://127.0.0.1:9/datasets/o/d/resolve/main/x.csv"


def http_error(status: int, headers: dict[str, str] | None = None, message: str | None = None) -> HfHubHTTPError:
    """The error huggingface_hub raises for a response (built by its own ``hf_raise_for_status``)."""
    request = httpx2.Request("GET", URL, headers={"Authorization": f"Bearer {SENTINEL}", "Cookie": SENTINEL})
    body = {"error": message} if message is not None else {}
    response = httpx2.Response(status, headers=headers or {}, json=body, request=request)
    with pytest.raises(HfHubHTTPError) as excinfo:
        hf_raise_for_status(response)
    return excinfo.value


@pytest.fixture()
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Seconds ``call_with_retries`` asked to sleep, recorded instead of slept."""
    recorded: list[float] = []
    monkeypatch.setattr(retry.time, "sleep", recorded.append)
    return recorded


class Flaky:
    """A call that raises the errors ``makers`` make, one per call, then returns ``"done"``."""

    def __init__(self, *makers: Callable[[], Exception]) -> None:
        self.plan = list(makers)
        self.raised: list[Exception] = []

    def __call__(self) -> str:
        if len(self.raised) == len(self.plan):
            return "done"
        make = self.plan[len(self.raised)]
        error = make()
        self.raised.append(error)
        raise error


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_transient_statuses_back_off_exponentially(status: int) -> None:
    error = http_error(status)
    assert [retry_delay(error, attempt, 0.5) for attempt in range(4)] == [0.5, 1.0, 2.0, 4.0]


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 412, 422, 501])
def test_other_statuses_are_permanent(status: int) -> None:
    assert retry_delay(http_error(status, {"Retry-After": "1"}), 0, 1.0) is None


def test_retry_after_is_honoured_but_never_shortens_the_backoff() -> None:
    assert retry_delay(http_error(429, {"Retry-After": "7"}), 0, 1.0) == 7.0
    assert retry_delay(http_error(503, {"Retry-After": " 3 "}), 1, 1.0) == 3.0
    assert retry_delay(http_error(429, {"Retry-After": "0"}), 2, 1.0) == 4.0  # backoff 1 * 2**2 wins
    # An HTTP-date (not seconds) falls back to the backoff.
    assert retry_delay(http_error(429, {"Retry-After": "Wed, 21 Oct 2026 07:28:00 GMT"}), 1, 1.0) == 2.0


def test_transport_errors_are_retried_other_errors_are_not() -> None:
    request = httpx2.Request("GET", URL)
    for error in (
        httpx2.ConnectError("connection refused", request=request),
        httpx2.ReadTimeout("timed out", request=request),
        httpx2.RemoteProtocolError("peer closed connection", request=request),
    ):
        assert retry_delay(error, 1, 2.0) == 4.0, error
    for error in (ValueError("bad"), KeyError("k"), OSError("disk"), RuntimeError("x")):
        assert retry_delay(error, 0, 1.0) is None, error


def test_call_with_retries_recovers_after_transient_failures(sleeps: list[float]) -> None:
    call = Flaky(lambda: http_error(503), lambda: http_error(429, {"Retry-After": "5"}), lambda: http_error(502))
    assert call_with_retries(call, retries=5, backoff_s=0.25) == "done"
    assert len(call.raised) == 3
    assert sleeps == [0.25, 5.0, 1.0]


def test_call_with_retries_stops_after_retries_and_reraises_the_last_error(sleeps: list[float]) -> None:
    call = Flaky(*[lambda: http_error(503)] * 10)
    with pytest.raises(HfHubHTTPError) as excinfo:
        call_with_retries(call, retries=3, backoff_s=1.0)
    assert len(call.raised) == 4  # the first try and 3 retries
    assert excinfo.value is call.raised[-1]
    assert sleeps == [1.0, 2.0, 4.0]


def test_call_with_retries_zero_retries_tries_once(sleeps: list[float]) -> None:
    call = Flaky(lambda: http_error(503))
    with pytest.raises(HfHubHTTPError):
        call_with_retries(call, retries=0)
    assert len(call.raised) == 1 and sleeps == []


@pytest.mark.parametrize(
    "make",
    [lambda: http_error(403), lambda: http_error(404), lambda: ValueError("bad input")],
    ids=["403", "404", "ValueError"],
)
def test_call_with_retries_raises_a_permanent_error_at_once(sleeps: list[float], make: Callable[[], Exception]) -> None:
    call = Flaky(make, make)
    with pytest.raises(Exception) as excinfo:
        call_with_retries(call, retries=5)
    assert excinfo.value is call.raised[0]
    assert len(call.raised) == 1 and sleeps == []


def test_describe_error_gives_the_status_and_first_server_line_never_request_headers() -> None:
    error = http_error(503, {"X-Error-Message": "Hub is down for maintenance"})
    assert SENTINEL in error.response.request.headers["Authorization"]  # the request did carry the token
    assert describe_error(error) == "HTTP 503: Hub is down for maintenance"
    assert describe_error(http_error(500, message="first line\nsecond line")) == "HTTP 500: first line"
    assert describe_error(http_error(502)) == "HTTP 502"
    long = describe_error(http_error(400, message="x" * 1000))
    assert long == "HTTP 400: " + "x" * 200
    for status in (401, 403, 404, 429, 503):
        assert SENTINEL not in describe_error(http_error(status, message="denied"))


def test_describe_error_of_other_errors_is_type_and_first_line() -> None:
    assert describe_error(ValueError("bad value\nmore detail")) == "ValueError: bad value"
    assert describe_error(ValueError()) == "ValueError"
    assert describe_error(ValueError("   ")) == "ValueError"
    request = httpx2.Request("GET", URL, headers={"Authorization": f"Bearer {SENTINEL}"})
    described = describe_error(httpx2.ConnectError("[Errno 111] Connection refused", request=request))
    assert described == "ConnectError: [Errno 111] Connection refused"


def test_describe_error_of_a_real_hub_refusal_hides_the_token(tmp_path: Path) -> None:
    root = tmp_path / "hub"
    (root / "models" / "o" / "m").mkdir(parents=True)
    (root / "models" / "o" / "m" / "config.json").write_text("{}")
    with HubServer(root, objects_dir=tmp_path / "objects") as server:
        server.inject("HEAD", "config.json", 403, headers={"X-Error-Message": "Access to o/m is restricted"})
        server.inject("GET", "config.json", 403, headers={"X-Error-Message": "Access to o/m is restricted"})
        with pytest.raises(Exception) as excinfo:
            hf_hub_download("o/m", "config.json", token=SENTINEL, endpoint=server.url, cache_dir=tmp_path / "cache")
        assert server.saw_token(SENTINEL)
    error = excinfo.value
    http = error if isinstance(error, HfHubHTTPError) else error.__cause__
    assert isinstance(http, HfHubHTTPError) and http.response.status_code == 403
    assert describe_error(http) == "HTTP 403: Access to o/m is restricted"
    assert SENTINEL not in describe_error(error)
