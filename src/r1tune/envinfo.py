"""`r1tune env`: versions (against constraints.txt), the CPU's matmul features, devices and the extras."""

from __future__ import annotations

import importlib.metadata as md
import logging
import os
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path

# The core packages whose version decides whether the suite's results apply (docs/dependencies.md).
PACKAGES = ("torch", "transformers", "peft", "accelerate", "tokenizers", "safetensors", "pydantic", "numpy")
# pyproject.toml's optional-dependencies (tests/test_envinfo.py keeps the two in step), and what needs each.
EXTRAS = {
    "qlora": (("bitsandbytes",), "quantization_bit (QLoRA), optim adamw_8bit/lion_8bit, export_quantization_bit"),
    "serve": (("fastapi", "uvicorn", "prometheus-client"), "r1tune serve"),
    "export": (("onnx", "onnxruntime", "onnxscript", "gguf"),
               "r1tune export with export_onnx (onnx, onnxruntime, onnxscript) or export_gguf (gguf)"),
    "deepspeed": (("deepspeed",), "the deepspeed key (ZeRO-0/2/3, CPU offload; docs/distributed.md)"),
}
# Not an extra (CUDA only, built against the user's torch): what attn_implementation: flash_attention_2 loads.
FLASH_ATTN = ("flash-attn", "attn_implementation: flash_attention_2 (CUDA only; pip install flash-attn)")

# bitsandbytes (0.49+) repacks a 4-bit weight for its CPU kernel on CPUs with AVX-512 BF16: output rows
# in blocks of 32 and the per-block scales as (out, in / 64), so it asserts or fails on a layer whose
# output width is not a multiple of 32 or whose input width is not a multiple of the 64-wide block.
CPU_4BIT_ROWS = 32
CPU_4BIT_BLOCKSIZE = 64

CPUINFO = Path("/proc/cpuinfo")
# The repository's constraints.txt (src/r1tune/envinfo.py -> repository root); a wheel install has none.
CONSTRAINTS = Path(__file__).resolve().parents[2] / "constraints.txt"


def version(name: str) -> str:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "not installed"


def installed(name: str) -> bool:
    return version(name) != "not installed"


# --- CPU ------------------------------------------------------------------------------------------------


@dataclass
class CpuInfo:
    """What /proc/cpuinfo says about the first CPU; known=False where there is no /proc/cpuinfo."""

    known: bool
    model: str = "unknown"
    flags: frozenset = field(default_factory=frozenset)

    def has(self, flag: str) -> bool | None:
        return (flag in self.flags) if self.known else None


def read_cpuinfo() -> str | None:
    try:
        return CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def cpu_info(text: str | None = None) -> CpuInfo:
    """Parse /proc/cpuinfo (or the given text): model name and the first processor's feature flags."""
    if text is None:
        text = read_cpuinfo()
    if text is None:
        return CpuInfo(known=False, model=platform.processor() or platform.machine() or "unknown")
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip().lower()
        if sep and key not in fields:
            fields[key] = value.strip()
    # x86 says "model name" and "flags"; arm64 says "Features" (and often no model name).
    model = fields.get("model name") or fields.get("hardware") or fields.get("cpu model") or platform.machine()
    flags = frozenset((fields.get("flags") or fields.get("features") or "").split())
    return CpuInfo(known=True, model=model or "unknown", flags=flags)


def cpu_bf16() -> bool:
    """AVX-512 BF16 or AMX on x86 (fast bf16 matmuls on CPU), unless oneDNN is capped below them.

    ONEDNN_MAX_CPU_ISA (oneDNN's own variable, read when asked) caps the instructions oneDNN uses: at
    AVX2 a bf16 matmul falls back to a reference kernel thousands of times slower, as on a CPU
    without AVX-512. Capping it (with ATEN_CPU_CAPABILITY=avx2) is how the suite is run as on such a CPU."""
    cpu = cpu_info()
    return bool(cpu.has("avx512_bf16") or cpu.has("amx_bf16")) and onednn_allows_bf16()


def cpu_int8_exact() -> bool:
    """int8 matmuls without int16 saturation: VNNI (AVX-512 or AVX) or AMX, and oneDNN allowed to use it."""
    cpu = cpu_info()
    vnni = any(cpu.has(flag) for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))
    return bool(vnni) and (_onednn_cap() == "ALL" or "VNNI" in _onednn_cap() or onednn_allows_bf16())


def onednn_allows_bf16() -> bool:
    cap = _onednn_cap()
    return cap == "ALL" or "BF16" in cap or "AMX" in cap or "FP16" in cap or cap.startswith("AVX10")


def _onednn_cap() -> str:
    """oneDNN's instruction-set cap (ONEDNN_MAX_CPU_ISA, read when asked), 'ALL' when none is set."""
    return (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()


AMX_FLAGS = ("amx_tile", "amx_bf16", "amx_int8")


def cpu_rows(cpu: CpuInfo) -> list[tuple[str, str]]:
    def yes_no(flag: str) -> str:
        has = cpu.has(flag)
        return "unknown (no /proc/cpuinfo on this system)" if has is None else ("yes" if has else "no")

    rows = [("cpu", cpu.model), ("cpu AVX2", yes_no("avx2")), ("cpu AVX-512F", yes_no("avx512f")),
            ("cpu AVX-512 BF16", yes_no("avx512_bf16"))]
    if not cpu.known:
        rows.append(("cpu AMX", yes_no("amx_tile")))
    else:
        present = [flag for flag in AMX_FLAGS if flag in cpu.flags]
        rows.append(("cpu AMX", f"yes ({', '.join(present)})" if present else "no"))
    return rows


def cpu_features() -> str:
    """One line for benchmark output: the CPU and its matmul features."""
    return "; ".join(f"{name.removeprefix('cpu ') if name != 'cpu' else 'cpu'} {value}" for name, value in cpu_rows(cpu_info()))


def torch_cpu_capability() -> str:
    """What torch dispatches its CPU kernels to (DEFAULT, AVX2, AVX512, ...)."""
    import torch

    get = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
    if get is None:
        return f"unknown (torch {torch.__version__} has no torch.backends.cpu.get_cpu_capability)"
    try:
        return str(get())
    except Exception as exc:  # noqa: BLE001 - a diagnostic command must not crash on a diagnostic
        return f"unknown ({type(exc).__name__}: {exc})"


def bnb_cpu_4bit() -> str:
    """Whether bitsandbytes' CPU 4-bit path repacks weights here (it does when has_avx512bf16() is True)."""
    if not installed("bitsandbytes"):
        return "bitsandbytes not installed (pip install 'r1tune[qlora]')"
    quiet = logging.getLogger("bitsandbytes")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # it warns on import when its optional CPU kernel package cannot load
    try:
        from bitsandbytes.functional import has_avx512bf16

        repacks = bool(has_avx512bf16())
    except Exception as exc:  # noqa: BLE001
        return f"unknown (bitsandbytes import failed: {type(exc).__name__}: {exc})"
    finally:
        quiet.setLevel(level)
    if repacks:
        return (f"repacks 4-bit weights for its AVX-512 BF16 kernel: a layer fits when its output width is "
                f"divisible by {CPU_4BIT_ROWS} and its input width by {CPU_4BIT_BLOCKSIZE} (r1tune keeps others "
                "fp32 in 4-bit exports)")
    return "no repacking (no AVX-512 BF16 kernel): any layer width"


# --- versions against constraints.txt ---------------------------------------------------------------------


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_constraints(path: Path | None = None) -> dict[str, str] | None:
    """{canonical name: pinned version} from constraints.txt, or None when there is none."""
    path = CONSTRAINTS if path is None else path
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return None
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        name, sep, pinned = line.partition("==")
        if sep:
            pins[_canonical(name.strip())] = pinned.strip()
    return pins


def _public(v: str) -> str:
    return v.split("+", 1)[0]  # torch 2.13.0+cpu is the 2.13.0 that constraints.txt pins


def tested_mark(name: str, installed_version: str, pins: dict[str, str] | None) -> str:
    if pins is None:
        return ""
    pinned = pins.get(_canonical(name))
    if pinned is None:
        return " (untested: not in constraints.txt)"
    if _public(installed_version) == _public(pinned):
        return " (tested)"
    return f" (untested: constraints.txt has {pinned})"


def package_row(name: str, pins: dict[str, str] | None) -> tuple[str, str]:
    v = version(name)
    return name, v if v == "not installed" else v + tested_mark(name, v, pins)


def extra_rows(pins: dict[str, str] | None) -> list[tuple[str, str]]:
    rows = []
    for extra, (names, use) in EXTRAS.items():
        missing = [name for name in names if not installed(name)]
        have = ", ".join(f"{name} {version(name)}{tested_mark(name, version(name), pins)}"
                         for name in names if name not in missing)
        if missing:
            value = (f"not installed: {', '.join(missing)} — pip install 'r1tune[{extra}]'"
                     + (f" (installed: {have})" if have else "") + f"; needed by {use}")
        else:
            value = f"{have}; for {use}"
        rows.append((f"extra [{extra}]", value))
    name, use = FLASH_ATTN
    rows.append((name.replace("-", "_"), f"{version(name)} — {use}"))
    return rows


def collect() -> list[tuple[str, str]]:
    import torch

    pins = read_constraints()
    rows = [("python", platform.python_version()), ("platform", platform.platform())]
    if pins is None:
        rows.append(("constraints.txt", f"not found at {CONSTRAINTS} (a wheel install): versions not compared"))
    else:
        rows.append(("constraints.txt", f"{CONSTRAINTS} (the tested set, docs/dependencies.md)"))
    rows += [package_row(name, pins) for name in PACKAGES]
    rows += cpu_rows(cpu_info())
    rows.append(("torch cpu capability", torch_cpu_capability()))
    rows.append(("bitsandbytes cpu 4-bit", bnb_cpu_4bit()))
    rows.append(("cpu threads", str(torch.get_num_threads())))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            rows.append((f"cuda:{i}", torch.cuda.get_device_name(i)))
        rows.append(("cuda bf16", "yes" if torch.cuda.is_bf16_supported() else "no"))
    else:
        rows.append(("cuda", "not available"))
    rows += extra_rows(pins)
    return rows
