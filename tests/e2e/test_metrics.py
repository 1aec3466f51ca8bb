"""The router's /metrics, parsed with the Prometheus text parser, agrees with the requests sent."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdserve.launch.local import LocalLauncher

pytestmark = pytest.mark.slow


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_the_requests_sent(disagg_shm: LocalLauncher) -> None:
    url = disagg_shm.url
    before = scrape(url)
    prompts = ["metrics one", "metrics two, a little longer", "m3"]
    for prompt in prompts:
        reply = httpx.post(
            f"{url}/v1/completions",
            json={"model": "tiny", "prompt": prompt, "max_tokens": 7, "ignore_eos": True, "temperature": 0},
            timeout=60,
        )
        assert reply.status_code == 200
    after = scrape(url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("pdserve_requests_total", outcome="finished") == 3
    assert delta("pdserve_generation_tokens_total") == 21
    assert delta("pdserve_prompt_tokens_total") == sum(len(p.encode()) + 1 for p in prompts)  # bytes + BOS
    assert delta("pdserve_time_to_first_token_seconds_count") == 3
    for part in ("queue", "prefill", "transfer", "delivery"):
        assert delta("pdserve_ttft_breakdown_seconds_count", part=part) == 3
    parts_sum = sum(
        delta("pdserve_ttft_breakdown_seconds_sum", part=part)
        for part in ("queue", "prefill", "transfer", "delivery")
    )
    assert parts_sum == pytest.approx(delta("pdserve_time_to_first_token_seconds_sum"), abs=1e-6)
    assert delta("pdserve_kv_transfer_duration_seconds_count") == 3
    assert delta("pdserve_e2e_request_latency_seconds_count") == 3
    assert delta("pdserve_inter_token_latency_seconds_count") >= 3 * 5
    # Prompts of ≤ 16 + 1 tokens: one 16-token block each... except the 29-token one (two blocks).
    per_block = 2 * 4 * 16 * 2 * 32 * 4
    assert delta("pdserve_kv_transfer_bytes_total") == (1 + 2 + 1) * per_block
    routed = sum(v for (name, _), v in after.items() if name == "pdserve_routing_decisions_total") - sum(
        v for (name, _), v in before.items() if name == "pdserve_routing_decisions_total"
    )
    assert routed == 6  # one prefill and one decode placement per request
    assert (
        value(after, "pdserve_workers", role="prefill") == 2
        and value(after, "pdserve_workers", role="decode") == 2
    )


def test_every_worker_serves_metrics_that_agree_with_the_router(disagg_shm: LocalLauncher) -> None:
    url = disagg_shm.url
    httpx.post(
        f"{url}/v1/completions", json={"model": "tiny", "prompt": "agree", "max_tokens": 3}, timeout=60
    )
    router = scrape(url)
    workers = {name: scrape(f"http://127.0.0.1:{port}") for name, port in disagg_shm.metrics_ports().items()}
    assert set(workers) == {"prefill-0", "prefill-1", "decode-0", "decode-1"}

    def total(name: str, prefix: str) -> float:
        return sum(
            v
            for w, samples in workers.items()
            if w.startswith(prefix)
            for (n, _), v in samples.items()
            if n == name
        )

    kv_bytes = value(router, "pdserve_kv_transfer_bytes_total")
    assert kv_bytes > 0
    assert total("pdserve_worker_kv_received_bytes_total", "decode") == kv_bytes
    assert total("pdserve_worker_kv_sent_bytes_total", "prefill") == kv_bytes
    assert total("pdserve_worker_prompt_tokens_computed_total", "decode") == 0
    assert total("pdserve_worker_prompt_tokens_computed_total", "prefill") > 0


def test_http_answers_are_counted_by_endpoint_and_status(disagg_shm: LocalLauncher) -> None:
    url = disagg_shm.url
    before = scrape(url)

    def status(**body: object) -> int:
        return httpx.post(f"{url}/v1/completions", json=body, timeout=30).status_code

    assert httpx.post(f"{url}/v1/completions", content=b"{not json", timeout=30).status_code == 400
    assert status(model="tiny", prompt="x", max_tokens=-1) == 400
    assert status(model="gpt-9", prompt="x") == 404
    assert status(model="tiny", prompt="x", max_tokens=2) == 200
    assert httpx.get(f"{url}/no/such/path", timeout=30).status_code == 404
    after = scrape(url)

    def delta(endpoint: str, code: str) -> float:
        labels = {"endpoint": endpoint, "status": code}
        name = "pdserve_http_responses_total"
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("/v1/completions", "400") == 2
    assert delta("/v1/completions", "404") == 1
    assert delta("/v1/completions", "200") == 1
    assert delta("other", "404") == 1
