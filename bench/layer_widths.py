"""Do layer widths that are not multiples of 32/64 cost speed on this CPU? (tiny-model sizing)

For each output width N the script times forward + backward of a linear layer (M tokens x K in
-> N out) in fp32 and in bf16, and prints the time per output column relative to N=128, side by
side in one run. A ratio well above 1.0 for an odd width means that width wastes kernel tiles.
Prints the CPU's matmul features beside the ratios, since AMX/AVX-512 kernels tile differently.

    python bench/layer_widths.py            # ~1 minute on 2 cores
"""

from __future__ import annotations

import time

import torch

from r1tune.envinfo import cpu_features

WIDTHS = (80, 96, 112, 128, 176, 192)
M, K, REPEATS = 4096, 256, 20


def seconds_per_step(n: int, dtype: torch.dtype) -> float:
    layer = torch.nn.Linear(K, n, bias=False).to(dtype)
    x = torch.randn(M, K, dtype=dtype, requires_grad=True)
    for _ in range(3):  # warm-up: oneDNN primitive creation
        layer(x).sum().backward()
    start = time.perf_counter()
    for _ in range(REPEATS):
        layer(x).sum().backward()
    return (time.perf_counter() - start) / REPEATS


def main() -> None:
    torch.manual_seed(0)
    print(f"{cpu_features()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"linear {M} tokens x {K} in -> N out, forward + backward; time per output column vs N=128")
    for dtype in (torch.float32, torch.bfloat16):
        times = {n: seconds_per_step(n, dtype) for n in WIDTHS}
        base = times[128] / 128
        cells = "  ".join(f"N={n}: {times[n] / n / base:.2f}" for n in WIDTHS)
        print(f"{str(dtype).removeprefix('torch.'):9s} {cells}")


if __name__ == "__main__":
    main()
