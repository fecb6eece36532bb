"""CUDA-event timing shared by the benchmarks: warm up, then time peer and candidate alternately."""
from __future__ import annotations

import statistics

import torch


def time_ms(fn, reps: int = 20) -> list[float]:
    """Per-call times in ms of ``fn()``, each bracketed by CUDA events."""
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b))
    return out


def compare(peer, ours, pairs: int = 15, inner: int = 5, warmup: int = 3) -> dict:
    """Time ``peer`` and ``ours`` alternately (A B A B ...); each sample averages ``inner`` calls.
    Returns median times and the median, min and max of the per-pair speed-ups peer/ours."""
    for _ in range(warmup):
        peer(), ours()
    torch.cuda.synchronize()
    tp, to, ratios = [], [], []
    for _ in range(pairs):
        p = statistics.fmean(time_ms(lambda: [peer() for _ in range(inner)], 1)) / inner
        o = statistics.fmean(time_ms(lambda: [ours() for _ in range(inner)], 1)) / inner
        tp.append(p), to.append(o), ratios.append(p / o)
    return dict(peer_ms=statistics.median(tp), ours_ms=statistics.median(to), ratio=statistics.median(ratios),
                lo=min(ratios), hi=max(ratios))


class Rotating:
    """Cycle through several buffers so no timed call finds its input in L2."""

    def __init__(self, items):
        self.items, self.i = list(items), 0

    def next(self):
        self.i = (self.i + 1) % len(self.items)
        return self.items[self.i]


def host_us(fn, calls: int = 2000, warmup: int = 50) -> float:
    """Wall time per call in µs of ``fn()`` issued back to back (median of 5 batches): the host cost
    when the GPU work per call is tiny."""
    import time

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls // 5):
            fn()
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - t0) / (calls // 5) * 1e6)
    return sorted(samples)[2]


def card() -> str:
    return torch.cuda.get_device_name()


def capture(fn, calls: int):
    """A CUDA graph of ``calls`` calls ``fn(i)`` (warmed up on a side stream first)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(3):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    return graph


def graph_compare(peer, ours, calls: int = 30, pairs: int = 9) -> dict:
    """Like ``compare`` but each side is a CUDA graph of ``calls`` calls ``fn(i)``, replayed
    alternately: device time per call without the host's launch cost (as in CUDA-graph decoding)."""
    gp, go = capture(peer, calls), capture(ours, calls)
    tp, to, ratios = [], [], []
    for _ in range(pairs):
        p = time_ms(gp.replay, 1)[0] / calls
        o = time_ms(go.replay, 1)[0] / calls
        tp.append(p), to.append(o), ratios.append(p / o)
    return dict(peer_ms=statistics.median(tp), ours_ms=statistics.median(to), ratio=statistics.median(ratios),
                lo=min(ratios), hi=max(ratios))
