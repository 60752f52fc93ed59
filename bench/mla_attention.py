"""MLA attention on CPU: torch's math path (unequal q/k and v head widths) vs v zero-padded to the fused kernel.

    python bench/mla_attention.py

One bf16 forward+backward of scaled_dot_product_attention per case, causal, batch 1, for the
tiny DeepSeek-V3's heads (7 heads, q/k 48, v 32) and DeepSeek-V3's own head widths (q/k 192,
v 128; 16 heads here to stay small), alternating the two paths. Prints the peak RSS above the
starting point (sampled every 2 ms, heap trimmed before each case), the time, and the largest
output difference. r1tune uses the padded path (src/r1tune/models/attention.py).
"""

from __future__ import annotations

import ctypes
import threading
import time

import psutil
import torch
import torch.nn.functional as F

PROC = psutil.Process()
CASES = [("tiny DeepSeek-V3", 7, 48, 32), ("DeepSeek-V3 widths", 16, 192, 128)]


class PeakRss:
    def __init__(self):
        self.peak = 0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            self.peak = max(self.peak, PROC.memory_info().rss)
            time.sleep(0.002)

    def reset(self) -> int:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        time.sleep(0.01)
        self.peak = PROC.memory_info().rss
        return self.peak


def attend(q, k, v, padded: bool):
    if not padded:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    width = v.shape[-1]
    return F.scaled_dot_product_attention(q, k, F.pad(v, (0, q.shape[-1] - width)), is_causal=True)[..., :width]


def run(heads: int, qk: int, v_width: int, seq: int, padded: bool, sampler: PeakRss):
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, heads, seq, qk, generator=gen, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    v = torch.randn(1, heads, seq, v_width, generator=gen, dtype=torch.bfloat16, requires_grad=True)
    start = sampler.reset()
    began = time.perf_counter()
    out = attend(q, k, v, padded)
    out.float().square().sum().backward()
    seconds = time.perf_counter() - began
    return out.detach().float(), (sampler.peak - start) / 2**20, seconds


def main() -> None:
    torch.manual_seed(0)
    sampler = PeakRss()
    print(f"{'heads / widths':<22}{'seq':>6}{'math MB':>9}{'fused MB':>10}{'math s':>8}{'fused s':>9}{'max diff (bf16)':>17}")
    for label, heads, qk, v_width in CASES:
        for seq in (1024, 2048):
            run(heads, qk, v_width, 128, True, sampler)  # warm up both kernels
            run(heads, qk, v_width, 128, False, sampler)
            (ref, mem_a, sec_a), (out, mem_b, sec_b) = (run(heads, qk, v_width, seq, p, sampler) for p in (False, True))
            print(f"{label:<22}{seq:>6}{mem_a:>9.0f}{mem_b:>10.0f}{sec_a:>8.2f}{sec_b:>9.2f}"
                  f"{(ref - out).abs().max().item():>17.1e}")


if __name__ == "__main__":
    main()
