"""`r1tune env`: CPU matmul features from /proc/cpuinfo, bitsandbytes' CPU 4-bit path, versions against
constraints.txt, and the extras of pyproject.toml."""

from pathlib import Path

import pytest

from r1tune import envinfo

# Abridged /proc/cpuinfo of a Sapphire Rapids Xeon (AVX-512 BF16 and AMX), two processors.
AMX_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2 avx512f avx512dq avx512cd avx512bw avx512vl \
avx_vnni avx512_bf16 avx512_vnni amx_bf16 avx512_fp16 amx_tile amx_int8

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8
"""
# An AMD Zen 2 (AVX2, no AVX-512).
AVX2_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma bmi2 avx2 sha_ni
"""


def use_cpuinfo(monkeypatch, tmp_path, text):
    path = tmp_path / "cpuinfo"
    if text is not None:
        path.write_text(text, encoding="utf-8")
    monkeypatch.setattr(envinfo, "CPUINFO", path)


def test_amx_cpu(monkeypatch, tmp_path):
    use_cpuinfo(monkeypatch, tmp_path, AMX_CPUINFO)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)  # the suite may run capped (as on an AVX2 CPU)
    rows = dict(envinfo.cpu_rows(envinfo.cpu_info()))
    assert rows == {"cpu": "Intel(R) Xeon(R) Platinum 8480+", "cpu AVX2": "yes", "cpu AVX-512F": "yes",
                    "cpu AVX-512 BF16": "yes", "cpu AMX": "yes (amx_tile, amx_bf16, amx_int8)"}
    assert envinfo.cpu_bf16() is True


def test_avx2_only_cpu(monkeypatch, tmp_path):
    use_cpuinfo(monkeypatch, tmp_path, AVX2_CPUINFO)
    rows = dict(envinfo.cpu_rows(envinfo.cpu_info()))
    assert rows == {"cpu": "AMD EPYC 7B12", "cpu AVX2": "yes", "cpu AVX-512F": "no", "cpu AVX-512 BF16": "no",
                    "cpu AMX": "no"}
    assert envinfo.cpu_bf16() is False


def test_no_proc_cpuinfo_says_unknown(monkeypatch, tmp_path):
    use_cpuinfo(monkeypatch, tmp_path, None)  # as on macOS or Windows
    cpu = envinfo.cpu_info()
    assert not cpu.known and cpu.has("avx2") is None
    rows = dict(envinfo.cpu_rows(cpu))
    for key in ("cpu AVX2", "cpu AVX-512F", "cpu AVX-512 BF16", "cpu AMX"):
        assert rows[key].startswith("unknown"), (key, rows[key])
    assert rows["cpu"]  # platform.processor() or the machine name, never empty
    assert envinfo.cpu_bf16() is False


def test_arm_features_line(monkeypatch, tmp_path):
    use_cpuinfo(monkeypatch, tmp_path, "processor\t: 0\nFeatures\t: fp asimd bf16 sve\nCPU part\t: 0xd40\n")
    rows = dict(envinfo.cpu_rows(envinfo.cpu_info()))
    assert rows["cpu AVX2"] == "no" and rows["cpu AMX"] == "no"


def test_collect_has_every_row(monkeypatch, tmp_path):
    use_cpuinfo(monkeypatch, tmp_path, AVX2_CPUINFO)
    rows = dict(envinfo.collect())
    for key in (*envinfo.PACKAGES, "cpu", "cpu AVX2", "cpu AVX-512F", "cpu AVX-512 BF16", "cpu AMX",
                "torch cpu capability", "bitsandbytes cpu 4-bit", "constraints.txt", "extra [qlora]",
                "extra [serve]", "extra [export]", "extra [deepspeed]", "flash_attn"):
        assert key in rows, key
    assert not any(key == "trl" for key in rows)
    assert rows["cpu"] == "AMD EPYC 7B12"
    import torch

    if hasattr(torch.backends.cpu, "get_cpu_capability"):
        assert rows["torch cpu capability"] == torch.backends.cpu.get_cpu_capability()


def test_bitsandbytes_repack_row(monkeypatch):
    if envinfo.installed("bitsandbytes"):
        import bitsandbytes.functional as F

        monkeypatch.setattr(F, "has_avx512bf16", lambda: True)
        assert "output width is divisible by 32 and its input width by 64" in envinfo.bnb_cpu_4bit()
        monkeypatch.setattr(F, "has_avx512bf16", lambda: False)
        assert envinfo.bnb_cpu_4bit().startswith("no repacking")
    real = envinfo.version
    monkeypatch.setattr(envinfo, "version", lambda name: "not installed" if name == "bitsandbytes" else real(name))
    assert envinfo.bnb_cpu_4bit() == "bitsandbytes not installed (pip install 'r1tune[qlora]')"


def test_tested_marks():
    pins = {"torch": "2.13.0", "transformers": "5.25.0", "prometheus-client": "0.26.0"}
    assert envinfo.tested_mark("torch", "2.13.0+cpu", pins) == " (tested)"
    assert envinfo.tested_mark("transformers", "5.26.0", pins) == " (untested: constraints.txt has 5.25.0)"
    assert envinfo.tested_mark("prometheus_client", "0.26.0", pins) == " (tested)"
    assert envinfo.tested_mark("peft", "0.21.2", pins) == " (untested: not in constraints.txt)"
    assert envinfo.tested_mark("peft", "0.21.2", None) == ""


def test_repository_constraints_are_read():
    pins = envinfo.read_constraints()
    assert pins is not None and pins["torch"] == "2.13.0" and "transformers" in pins
    assert envinfo.read_constraints(Path("/no/such/constraints.txt")) is None


def test_missing_extra_says_how_to_install(monkeypatch):
    real = envinfo.version
    monkeypatch.setattr(envinfo, "version", lambda name: "not installed" if name == "fastapi" else real(name))
    rows = dict(envinfo.extra_rows({}))
    assert rows["extra [serve]"].startswith("not installed: fastapi — pip install 'r1tune[serve]'")
    assert "needed by r1tune serve" in rows["extra [serve]"]


def test_extras_match_pyproject():
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    root = Path(__file__).resolve().parent.parent
    optional = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "optional-dependencies"]
    declared = {extra: tuple(Requirement(line).name for line in lines)
                for extra, lines in optional.items() if extra != "dev"}
    assert declared == {extra: names for extra, (names, _) in envinfo.EXTRAS.items()}


def test_onednn_cap_turns_native_bf16_and_exact_int8_off(monkeypatch, tmp_path):
    use_cpuinfo(monkeypatch, tmp_path, AMX_CPUINFO)
    for cap, exact in ((None, True), ("AVX2", False), ("AVX2_VNNI", True), ("AVX512_CORE_VNNI", True)):
        if cap is None:
            monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        else:
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        assert envinfo.cpu_int8_exact() is exact, cap
    use_cpuinfo(monkeypatch, tmp_path, AVX2_CPUINFO)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert not envinfo.cpu_int8_exact() and not envinfo.cpu_bf16()
    use_cpuinfo(monkeypatch, tmp_path, AMX_CPUINFO)
    for cap, native in ((None, True), ("AVX2", False), ("avx512_core", False), ("AVX512_CORE_BF16", True),
                        ("AVX512_CORE_AMX", True), ("ALL", True)):
        if cap is None:
            monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        else:
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        assert envinfo.cpu_bf16() is native, cap
