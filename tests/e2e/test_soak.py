"""A short soak: sustained load with no errors and resident memory growth under 5% after warm-up."""

from __future__ import annotations

from loadtests.soak import soak
from rmserve.launch import CLEAN_EXIT, start_server


def test_short_soak_has_no_errors_and_flat_memory(tiny_model_dirs, tmp_path):
    server = start_server(
        ["--model", str(tiny_model_dirs["llama"]), "--dtype", "float32"], tmp_path / "server.log"
    )
    try:
        report = soak(
            server.url, server.process.pid, seconds=15, warmup_requests=200, concurrency=8, sample_every=5
        )
    finally:
        assert server.stop() == CLEAN_EXIT, server.log_text()
    assert report.requests > 100 and report.errors == 0
    assert report.growth < 0.05, report
    times = [t for t, _ in report.rss_samples]  # 0, about every 5 s, then the end
    assert times[0] == 0 and times == sorted(times) and len(times) >= 4
    assert [round(t / 5) for t in times[1:-1]] == list(range(1, len(times) - 1))
    assert report.rss_samples[0][1] == report.rss_after_warmup and report.rss_samples[-1][1] == report.rss_end
    assert 0 < report.latency_p50_s <= report.latency_p99_s
