"""Is torch._int_mm exact on this CPU? (why int8 export falls back to fp32 products without VNNI)

Multiplies random full-range int8 matrices (token rows x 512 x 96, as an int8 export's activations
and weights) with torch._int_mm and with r1tune's int8 product, and prints the largest error
relative to the largest exact int32 result. On a CPU without VNNI oneDNN's int8 kernel adds pairs
of products in saturating int16; run it capped to see that kind here:

    python bench/int8_kernel.py
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python bench/int8_kernel.py
"""

from __future__ import annotations

import torch

from r1tune.envinfo import cpu_features, cpu_int8_exact
from r1tune.export.int8 import _int_matmul


def relative_error(out: torch.Tensor, exact: torch.Tensor) -> float:
    return ((out - exact).abs().max() / exact.abs().max()).item()


def main() -> None:
    torch.manual_seed(0)
    print(f"{cpu_features()}; oneDNN int8 exact here: {cpu_int8_exact()}")
    for name, weight_range in (("full-range weights (-127..127)", 127), ("7-bit weights (-63..63)", 63)):
        x = torch.randint(-127, 128, (256, 512), dtype=torch.int8)
        w = torch.randint(-weight_range, weight_range + 1, (96, 512), dtype=torch.int8)
        exact = x.int() @ w.int().t()
        print(f"{name}: torch._int_mm error {relative_error(torch._int_mm(x, w.t()), exact):.4f}, "
              f"r1tune's product {relative_error(_int_matmul(x, w), exact):.4f} (of the largest result)")


if __name__ == "__main__":
    main()
