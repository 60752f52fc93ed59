"""Resolve the `dataset` key: a file path, or names in dataset_dir/dataset_info.json.

The registry file uses LLaMA-Factory's schema (file_name, formatting, columns, tags),
so a LLaMA-Factory data folder works unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from r1tune.data.formats import FormatSpec
from r1tune.errors import UserError, did_you_mean


@dataclass
class DatasetSource:
    name: str
    path: Path
    spec: FormatSpec


def resolve_datasets(dataset: str, dataset_dir: str) -> list[DatasetSource]:
    sources = []
    for item in (part.strip() for part in dataset.split(",")):
        if not item:
            continue
        if Path(item).suffix in (".json", ".jsonl") or Path(item).is_file():
            sources.append(DatasetSource(item, Path(item), FormatSpec()))
        else:
            sources.append(_from_registry(item, Path(dataset_dir)))
    if not sources:
        raise UserError("config key 'dataset' is empty; give a data file path or a dataset_info.json name")
    return sources


def _from_registry(name: str, folder: Path) -> DatasetSource:
    info_path = folder / "dataset_info.json"
    if not info_path.is_file():
        raise UserError(
            f"dataset '{name}' is not a file and '{info_path}' does not exist; give a .json/.jsonl path or set dataset_dir")
    info = _read_info(info_path)
    if name not in info:
        raise UserError(f"dataset '{name}' is not listed in {info_path}{did_you_mean(name, info)}")
    entry = info[name]
    where = f"{info_path} entry '{name}'"
    if not isinstance(entry, dict):
        raise UserError(f"{where}: must be an object with 'file_name'")
    if "file_name" not in entry:
        hub = next((k for k in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url") if k in entry), None)
        hint = f" ('{hub}' needs a download, which r1tune does not do)" if hub else ""
        raise UserError(f"{where}: field 'file_name' is missing{hint}; point it at a local .json/.jsonl file")
    if entry.get("ranking"):
        raise UserError(f"{where}: 'ranking' (preference) data is not supported by the sft stage yet")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt", "openai"):
        raise UserError(f"{where}: field 'formatting' is '{formatting}'; use alpaca, sharegpt or openai")
    if not isinstance(entry["file_name"], str) or not entry["file_name"]:
        raise UserError(f"{where}: field 'file_name' must be a file name string")
    for key in ("columns", "tags"):
        if not isinstance(entry.get(key) or {}, dict):
            raise UserError(f"{where}: field '{key}' must be an object mapping names to column names")
    spec = FormatSpec(formatting, dict(entry.get("columns") or {}), dict(entry.get("tags") or {}))
    return DatasetSource(name, folder / entry["file_name"], spec)


def _read_info(path: Path) -> dict:
    try:
        info = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; convert the file to UTF-8") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} line {exc.lineno}: malformed JSON ({exc.msg}); fix the file") from None
    if not isinstance(info, dict):
        raise UserError(f"{path}: must be an object mapping dataset names to entries")
    return info
