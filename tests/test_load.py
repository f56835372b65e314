"""Load: four times more clients than the workers and queue hold, against a real server on loopback."""

import asyncio

import httpx
import psutil
import pytest
from test_server import AUTH, assert_error, start_server

pytestmark = pytest.mark.slow

WORKERS, QUEUE = 1, 1
CLIENTS = 4 * (WORKERS + QUEUE)
REQUESTS_PER_CLIENT = 3
BODY = {"model_name": "SD1.5", "prompt": "a red cube", "height": 64, "width": 64, "steps": 4}


async def _client(url: str, results: list[httpx.Response]) -> None:
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=600) as client:
        for _ in range(REQUESTS_PER_CLIENT):
            results.append(await client.post("/v1/image/generation", json=BODY))


async def _round(url: str) -> list[httpx.Response]:
    results: list[httpx.Response] = []
    await asyncio.gather(*(_client(url, results) for _ in range(CLIENTS)))
    return results


def _queue_depth(url: str) -> float:
    metrics = httpx.get(f"{url}/metrics", headers=AUTH).text
    return float(next(line.split()[1] for line in metrics.splitlines() if line.startswith("sdaot_queue_depth ")))


def test_overload_gets_429_with_retry_after_and_every_accepted_request_completes():
    proc, url = start_server(["--models", "SD1.5", "--workers", str(WORKERS), "--queue-size", str(QUEUE)])
    try:
        warm = asyncio.run(_round(url))
        assert all(r.status_code in (200, 429) for r in warm), [r.status_code for r in warm]
        rss_warm = psutil.Process(proc.pid).memory_info().rss
        results = asyncio.run(_round(url)) + asyncio.run(_round(url))
        codes = [r.status_code for r in results]
        assert len(results) == 2 * CLIENTS * REQUESTS_PER_CLIENT
        assert not [c for c in codes if c >= 500], codes
        assert set(codes) <= {200, 429}, codes
        assert codes.count(429) > 0 and codes.count(200) >= 2 * (WORKERS + QUEUE), codes
        for r in results:
            if r.status_code == 429:
                assert int(r.headers["Retry-After"]) > 0
                assert_error(r, 429)
            else:
                assert len(r.json()["images"]) == 1 and r.json()["images"][0]["image"]
        assert _queue_depth(url) == 0
        rss_after = psutil.Process(proc.pid).memory_info().rss
        assert rss_after <= 1.10 * rss_warm, (rss_warm, rss_after)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
