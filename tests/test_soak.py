"""The soak, reduced (issue 10, item 2): 32 OpenAI clients against a `vlmhub route` process
over three stand-in engines of which two fit, for at least 20 swaps after a warm-up. Every
request is counted; the router's own descriptors, TCP connections, threads and RSS are read
from /proc before and after. The full size is `python benchmarks/soak.py` (docs/reliability.md).
"""

from __future__ import annotations

from pathlib import Path

from vlmhub.testing.soak import run_soak

RSS_SLACK_KIB = 16 * 1024
"""RSS may grow this much over a run (allocator arenas, caches warming): a leak of one object
per request would pass it within the full-size soak, which is where steadiness is read."""


def test_soak_32_clients_over_20_swaps_lose_nothing_and_leak_nothing(tmp_path: Path) -> None:
    res = run_soak(tmp_path, clients=32, swaps=20, limit_s=150)
    print(res.summary())
    assert res.swaps >= 23, res.summary()  # 3 in the warm-up, 20 after the first sample
    assert res.lost == [], res.lost[:5]
    assert res.wrong == [], res.wrong[:5]
    assert res.undocumented == {}, res.summary()
    assert res.ok == res.statuses[200] and res.ok > 0
    assert sum(res.statuses.values()) + len(res.lost) == res.requests
    assert 0 < res.peak_ledger_gib <= 8.0 + 1e-9, "never over the (simulated) GPU"
    b, a = res.before, res.after
    assert b is not None and a is not None
    assert a.fds <= b.fds, res.summary()  # no descriptor left behind
    assert a.tcp <= b.tcp, res.summary()  # no connection left open
    assert a.threads <= b.threads, res.summary()
    assert a.rss_kib - b.rss_kib <= RSS_SLACK_KIB, res.summary()
