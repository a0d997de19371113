"""What the machine allows, measured in the same run as what we achieve: memory bandwidth (a
large copy) and matrix-multiply throughput (a large square product), and the bytes a decode
step must read. Decode at batch 1 is bound by reading the weights and the KV cache, so its
achieved bytes/s over the copy's bandwidth says how close it runs to the limit; prefill is
bound by matrix products, so its FLOP/s over the product's throughput says the same.
"""
from __future__ import annotations

import statistics
import time

import torch

from .flops import lm_weight_params


def _median_seconds(fn, repeats: int, device) -> float:
    fn()  # warm-up: allocation, first-touch page faults, kernel selection
    times = []
    for _ in range(repeats):
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def memory_bandwidth(device="cpu", nbytes: int = 1 << 28, repeats: int = 9) -> float:
    """Bytes/s of copying a `nbytes` buffer (counted as read + write, 2 * nbytes), median;
    the buffer is far larger than the caches."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / _median_seconds(lambda: dst.copy_(src), repeats, device)


def matmul_throughput(device="cpu", n: int = 2048, dtype=torch.float32,
                      repeats: int = 9) -> float:
    """FLOP/s of an (n, n) x (n, n) product (2 n^3 FLOPs), median."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return 2 * n ** 3 / _median_seconds(lambda: a @ b, repeats, device)


def decode_step_bytes(model, cache) -> int:
    """Bytes one decode step must read: every LM weight once (not the embedding table, of
    which one row a token is read) and every cached key and value the step attends over (a
    static cache is attended over whole)."""
    itemsize = next(model.language_model.parameters()).element_size()
    kv = cache.allocated_bytes() if hasattr(cache, "allocated_bytes") else cache.nbytes()
    return lm_weight_params(model.cfg.text) * itemsize + kv
