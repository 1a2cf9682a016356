"""The serving benchmark's arithmetic (not its timings)."""

import pytest

from modeltest.bench.serve_metrics import RequestResult, parse_goodput, serving_metrics
from modeltest.errors import UserError


def results():
    return [
        RequestResult(ok=True, prompt_tokens=10, output_tokens=5, ttft_s=0.1, e2el_s=0.5, itl_s=[0.1] * 4),
        RequestResult(ok=True, prompt_tokens=20, output_tokens=1, ttft_s=0.3, e2el_s=0.3, itl_s=[]),
        RequestResult(ok=True, prompt_tokens=30, output_tokens=3, ttft_s=0.2, e2el_s=1.2, itl_s=[0.5, 0.5]),
        RequestResult(ok=False, error="HTTP 500: boom"),
    ]


def test_counts_throughputs_and_latencies():
    m = serving_metrics(results(), duration_s=2.0, slo_ms={"ttft": 250, "tpot": 200})
    assert m["successful_requests"] == 3 and m["failed_requests"] == 1 and m["errors"] == {"HTTP 500: boom": 1}
    assert m["total_input_tokens"] == 60 and m["total_output_tokens"] == 9
    assert m["request_throughput"] == pytest.approx(1.5) and m["output_token_throughput"] == pytest.approx(4.5)
    assert m["total_token_throughput"] == pytest.approx(34.5)
    assert m["ttft"]["mean_ms"] == pytest.approx(200) and m["ttft"]["median_ms"] == pytest.approx(200)
    # TPOT: (0.5 - 0.1) / 4 = 100 ms and (1.2 - 0.2) / 2 = 500 ms; the one-token answer has none.
    assert m["tpot"]["mean_ms"] == pytest.approx(300)
    assert m["itl"]["mean_ms"] == pytest.approx((0.4 + 1.0) / 6 * 1000)
    for name in ("ttft", "tpot", "itl", "e2el"):
        s = m[name]
        assert s["median_ms"] <= s["p90_ms"] <= s["p99_ms"], name
    # Goodput: request 1 (100 / 100 ms) and request 2 (300 ms TTFT: misses) and 3 (TPOT 500: misses).
    assert m["goodput"]["good_requests"] == 1 and m["goodput"]["request_goodput"] == pytest.approx(0.5)
    assert m["concurrency"] == pytest.approx((0.5 + 0.3 + 1.2) / 2.0)


def test_nothing_succeeded_and_bad_slo_names():
    m = serving_metrics([RequestResult(ok=False, error="x")], duration_s=1.0)
    assert m["successful_requests"] == 0 and m["ttft"]["mean_ms"] is None and "goodput" not in m
    assert parse_goodput(["ttft:500", "e2el:2000"]) == {"ttft": 500.0, "e2el": 2000.0}
    with pytest.raises(UserError, match="ttft, tpot or e2el"):
        parse_goodput(["latency:5"])


def test_a_reset_connection_is_reported_as_one():
    """bench-serve names what broke a request: a reset as a reset (also when the client wraps
    it), a server's error body by its message."""
    import httpx
    import openai

    from modeltest.bench.serve_bench import failure

    reset = httpx.RemoteProtocolError("peer closed connection without sending complete message body")
    assert failure(reset).startswith("connection reset by the server (RemoteProtocolError")
    request = httpx.Request("POST", "http://127.0.0.1:1/v1/chat/completions")
    try:
        raise openai.APIConnectionError(request=request) from reset
    except openai.APIConnectionError as wrapped:
        assert failure(wrapped).startswith("connection reset by the server")
    refused = openai.BadRequestError(
        "Error code: 400", response=httpx.Response(400, request=request), body={"message": "bad image"}
    )
    assert failure(refused) == "bad image"
