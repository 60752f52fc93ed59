"""constraints.txt pins every direct dependency inside pyproject's ranges, and CI runs README's command (b)."""

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
requirements = pytest.importorskip("packaging.requirements")
from packaging.utils import canonicalize_name  # noqa: E402  (packaging is importable: checked above)

ROOT = Path(__file__).resolve().parent.parent


def direct_requirements():
    """Every requirement pyproject names: dependencies and each optional extra (r1tune[...] self-references
    excluded), as (where, Requirement)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    groups = {"dependencies": project["dependencies"], **{f"[{k}]": v for k, v in
                                                           project.get("optional-dependencies", {}).items()}}
    out = []
    for where, lines in groups.items():
        for line in lines:
            req = requirements.Requirement(line)
            if canonicalize_name(req.name) != canonicalize_name(project["name"]):
                out.append((where, req))
    return out


def constraint_pins():
    pins = {}
    for number, line in enumerate((ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        assert match, f"constraints.txt line {number} is not NAME==VERSION: {line!r}"
        name = canonicalize_name(match.group(1))
        assert name not in pins, f"constraints.txt pins {name} twice"
        pins[name] = match.group(2)
    return pins


def test_constraints_pin_every_direct_dependency_inside_its_range():
    pins = constraint_pins()
    assert "r1tune" not in pins and "pip" not in pins and "setuptools" not in pins
    missing, outside = [], []
    for where, req in direct_requirements():
        name = canonicalize_name(req.name)
        if name not in pins:
            missing.append(f"{req.name} ({where})")
        elif not req.specifier.contains(pins[name], prereleases=True):
            outside.append(f"{req.name}=={pins[name]} is outside {req.specifier} ({where})")
    assert not missing, "constraints.txt has no pin for: " + ", ".join(missing)
    assert not outside, "; ".join(outside)


def test_fast_moving_libraries_have_upper_bounds_and_torch_has_none():
    reqs = {canonicalize_name(req.name): req for _, req in direct_requirements()}
    for name in ("transformers", "peft", "accelerate", "tokenizers", "safetensors", "bitsandbytes", "fastapi", "deepspeed",
                 "onnx", "onnxruntime", "onnxscript", "gguf"):
        assert any(spec.operator in ("<", "<=", "~=", "==") for spec in reqs[name].specifier), \
            f"{name} has no upper bound in pyproject.toml"
    # Users bring their own CUDA torch: no upper bound, and the pinned build is torch 2.13.0.
    assert all(spec.operator in (">=", ">", "!=") for spec in reqs["torch"].specifier)
    assert constraint_pins()["torch"] == "2.13.0"


def ci_install_line():
    lines = [line for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
             if line.startswith("pip install")]
    assert len(lines) == 1, f".ci/run should have exactly one 'pip install' line, has {len(lines)}"
    return lines[0]


def readme_command_b(path="README.md"):
    """The first line starting with 'pip install' in the first code block after the text '(b)'."""
    text = (ROOT / path).read_text(encoding="utf-8")
    start = text.find("(b)")
    assert start >= 0, f"{path} has no '(b)'"
    block = re.search(r"```[^\n]*\n(.*?)```", text[start:], re.S)
    assert block, f"{path} has no code block after '(b)'"
    lines = [line for line in block.group(1).splitlines() if line.startswith("pip install")]
    assert lines, f"{path}'s code block after '(b)' has no line starting with 'pip install'"
    return lines[0]


def test_ci_uses_constraints():
    line = ci_install_line()
    assert "-c constraints.txt" in line
    assert "torch==2.13.0" in line and '".[dev]"' in line


def test_ci_runs_readme_command_b_verbatim():
    assert ci_install_line() == readme_command_b("README.md")
