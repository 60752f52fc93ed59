"""The main-process gate: which process of a (future) multi-process run writes files and prints.

Every file a training run writes and every line it prints goes through `is_main()`, so a run started
as N processes logs, plots and saves once. The rank comes from torch.distributed once a process
group is up, else from the RANK variable torchrun and accelerate set; a plain run is rank 0.
"""

from __future__ import annotations

import os
import sys


def rank() -> int:
    dist = sys.modules.get("torch.distributed")  # never import torch just to ask
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0") or 0)


def is_main() -> bool:
    return rank() == 0
