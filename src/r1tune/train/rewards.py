"""Reward functions for GRPO (issue 18, first part): r1tune's built-ins and users' own, with TRL's
calling convention so TRL reward functions work unchanged.

A reward function is called as f(prompts=..., completions=..., completion_ids=..., **columns), where
columns are the dataset's other fields (e.g. `answer`), one value per completion, and returns one float
per completion, or None where it abstains. Completions are strings, or for conversational data TRL's
[{"role": "assistant", "content": text}] lists; the built-ins read both.

Nothing here evaluates model output as code: math answers are compared as normalised strings and as
exact fractions, never through sympy's parse_expr (which runs eval).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
from fractions import Fraction
from pathlib import Path
from typing import Callable

from r1tune.data.reasoning import prompt_opens_reasoning, split_output
from r1tune.errors import UserError

RewardFunc = Callable[..., list]


def text_of(item) -> str:
    """A prompt or completion as text: a string, or the last message's content of a message list."""
    if isinstance(item, str):
        return item
    if isinstance(item, list) and item and isinstance(item[-1], dict):
        return str(item[-1].get("content", ""))
    return str(item)


def _opened(prompt) -> bool:
    return isinstance(prompt, str) and prompt_opens_reasoning(prompt)


def think_format(prompts: list, completions: list, prompt_texts: list | None = None, **_) -> list[float]:
    """1.0 when a completion is non-empty reasoning, `</think>`, then a non-empty answer, else 0.0.
    Where the prompt already opened `<think>` (R1-Distill templates) the completion starts inside it;
    r1tune passes the rendered prompts as `prompt_texts` (conversational `prompts` are messages)."""
    scores = []
    for prompt, completion in zip(prompt_texts or prompts, completions):
        reasoning, answer = split_output(text_of(completion), _opened(prompt))  # unclosed: answer ""
        scores.append(1.0 if reasoning and answer else 0.0)
    return scores


_BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def final_answer(completion, prompt=None) -> str:
    """The text after `</think>` (the whole text when there is no reasoning); a `\\boxed{...}` in it wins."""
    _, answer = split_output(text_of(completion), _opened(prompt))
    boxed = _BOXED.findall(answer)
    return boxed[-1].strip() if boxed else answer


def normalise_math(text: str) -> str:
    """Spacing, `$`, `\\left`/`\\right`, `\\dfrac`, a trailing period and case removed; `\\frac{a}{b}` as (a)/(b)."""
    text = text.strip().rstrip(".").replace("$", "")
    for token in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\displaystyle"):
        text = text.replace(token, "")
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"(\1)/(\2)", text)
    text = re.sub(r"\\text\{([^{}]*)\}", r"\1", text)
    text = re.sub(r"\s+", "", text).lower()
    return re.sub(r"\((-?\w+)\)", r"\1", text)  # (3)/(4) -> 3/4


def as_number(text: str) -> Fraction | None:
    """A plain number (commas, a percent sign, a fraction a/b allowed) as an exact Fraction, else None."""
    text = normalise_math(text).replace(",", "").rstrip("%")
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(predicted: str, reference: str) -> bool:
    """Exact (normalised), numeric (the last number of the prediction against a numeric reference),
    or the same normalised math expression."""
    if normalise_math(predicted) == normalise_math(reference):
        return True
    target = as_number(reference)
    if target is None:
        return False
    numbers = _NUMBER.findall(predicted.replace("$", ""))
    value = as_number(numbers[-1]) if numbers else None
    return value is not None and value == target


def accuracy(prompts: list, completions: list, answer: list | None = None, solution: list | None = None,
             prompt_texts: list | None = None, **_) -> list[float | None]:
    """1.0 when the final answer after `</think>` matches the record's `answer` (or `solution`), else 0.0;
    None (abstain) for records without one."""
    n = len(completions)
    references = [a if a is not None else s for a, s in zip(answer or [None] * n, solution or [None] * n)]
    return [None if ref is None or str(ref).strip() == "" else
            float(answers_match(final_answer(completion, prompt), str(ref)))
            for prompt, completion, ref in zip(prompt_texts or prompts, completions, references)]


def soft_overlong(max_completion_length: int, buffer: int) -> RewardFunc:
    """DAPO's soft overlong penalty: 0 up to max - buffer tokens, then falling linearly to -1 at max
    (and -1 beyond)."""
    if buffer <= 0 or buffer > max_completion_length:
        raise UserError(f"the length reward's buffer must be between 1 and max_completion_length "
                        f"({max_completion_length}), got {buffer}; set overlong_buffer_len accordingly")

    def length(completion_ids: list, **_) -> list[float]:
        start = max_completion_length - buffer
        return [max(-1.0, min(0.0, (start - len(ids)) / buffer)) for ids in completion_ids]

    return length


BUILT_IN = {"think_format": think_format, "accuracy": accuracy}


def load_reward_func(spec: str, key: str = "reward_funcs") -> RewardFunc:
    """A built-in name, `path/to/file.py:function` or `package.module:function`."""
    if spec in BUILT_IN:
        return BUILT_IN[spec]
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise UserError(f"config key '{key}': '{spec}' is neither a built-in reward ({', '.join(BUILT_IN)}, length) "
                        "nor 'file.py:function' / 'module:function'")
    module = _load_file(where, key, spec) if where.endswith(".py") else _import(where, key, spec)
    func = getattr(module, name, None)
    if not callable(func):
        raise UserError(f"config key '{key}': '{where}' has no function '{name}'")
    return func


def _load_file(path: str, key: str, spec: str):
    file = Path(path)
    if not file.is_file():
        raise UserError(f"config key '{key}': reward file '{path}' (in '{spec}') does not exist")
    module_spec = importlib.util.spec_from_file_location(f"r1tune_reward_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # the user's file: report it in one line
        raise UserError(f"config key '{key}': loading '{path}' failed: {type(exc).__name__}: {exc}") from exc
    return module


def _import(name: str, key: str, spec: str):
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise UserError(f"config key '{key}': cannot import module '{name}' (in '{spec}'): {exc}; "
                        f"give a file path ending in .py or a module on PYTHONPATH") from exc


def func_name(func) -> str:
    return getattr(func, "__name__", type(func).__name__)


def call_reward(func, n: int, checked: bool = True, **inputs) -> list[float]:
    """func(**inputs) as n floats (NaN where it abstained). With `checked` (GRPO checks every call: it costs
    nothing next to generation), an exception, a wrong count or a non-number is one line naming the
    function and what it returned."""
    name = func_name(func)
    try:
        values = func(**inputs)
    except Exception as exc:
        if not checked:
            raise
        raise UserError(f"reward function '{name}' raised {type(exc).__name__}: {exc}") from exc
    if checked:
        _check_values(name, values, n)
    return [math.nan if v is None else float(v) for v in values]


def _check_values(name: str, values, n: int) -> None:
    if not isinstance(values, (list, tuple)):
        raise UserError(f"reward function '{name}' returned {type(values).__name__} {_short(values)}; "
                        f"it must return a list of {n} floats (None to abstain), one per completion")
    if len(values) != n:
        raise UserError(f"reward function '{name}' returned {len(values)} values for {n} completions; "
                        "it must return one float (or None) per completion")
    for i, value in enumerate(values):
        ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
        if not ok or (value is not None and math.isinf(float(value))):
            raise UserError(f"reward function '{name}' returned {_short(value)} for completion {i}; "
                            "each value must be a finite float (or None to abstain)")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def combine(per_func: list[list[float]], weights: list[float] | None = None) -> list[float]:
    """Weighted sum over functions per completion, abstentions (NaN) skipped as in TRL; NaN where
    every function abstained."""
    if weights is not None and len(weights) != len(per_func):
        raise UserError(f"config key 'reward_weights' has {len(weights)} weights for {len(per_func)} reward "
                        "functions; give one weight per entry of reward_funcs")
    weights = weights or [1.0] * len(per_func)
    totals = []
    for values in zip(*per_func):
        present = [w * v for w, v in zip(weights, values) if not math.isnan(v)]
        totals.append(sum(present) if present else math.nan)
    return totals

