"""GRPO reward functions (train/rewards.py): built-ins, users' TRL-style functions, first-batch checks."""

import math

import pytest

from r1tune.errors import UserError
from r1tune.train.rewards import (accuracy, answers_match, call_reward, combine, load_reward_func, soft_overlong,
                                  think_format)

PLAIN = "<｜User｜>What is 6 * 7?<｜Assistant｜>"
OPENED = PLAIN + "<think>\n"  # R1-Distill templates open the reasoning in the prompt


def test_think_format_knows_when_the_prompt_opened_think():
    completions = ["<think>6 sevens</think>42", "42", "<think>6 sevens</think>", "<think></think>42",
                   "<think>never closed"]
    assert think_format([PLAIN] * 5, completions) == [1.0, 0.0, 0.0, 0.0, 0.0]
    # after an opened prompt the completion starts inside the reasoning
    assert think_format([OPENED] * 2, ["6 sevens</think>42", "<think>x</think>42"]) == [1.0, 1.0]
    assert think_format([PLAIN], ["6 sevens</think>42"]) == [0.0]
    # TRL's conversational form
    assert think_format([[{"role": "user", "content": "q"}]],
                        [[{"role": "assistant", "content": "<think>r</think>a"}]]) == [1.0]


@pytest.mark.parametrize("completion, reference, expected", [
    ("<think>6 * 7</think>The answer is 42.", "42", 1.0),
    ("<think>6 * 7</think>The answer is 41.", "42", 0.0),
    ("<think>it is 42</think>I don't know", "42", 0.0),  # a number in the reasoning does not count
    ("<think>r</think>$\\boxed{\\dfrac{3}{4}}$", "3/4", 1.0),
    ("<think>r</think>0.75", "\\frac{3}{4}", 1.0),
    ("<think>r</think>1,000 apples", "1000", 1.0),
    ("<think>r</think>Paris", "paris.", 1.0),
    ("<think>r</think>x^{2} + 1", "x^{2}+1", 1.0),
    ("<think>r</think>x^2 + 2", "x^{2}+1", 0.0),
])
def test_accuracy_compares_the_final_answer(completion, reference, expected):
    assert accuracy([PLAIN], [completion], answer=[reference]) == [expected]


def test_accuracy_abstains_without_an_answer_and_reads_solution():
    assert accuracy([PLAIN, PLAIN], ["<think>r</think>4", "<think>r</think>4"], answer=["4", None]) == [1.0, None]
    assert accuracy([PLAIN], ["<think>r</think>4"]) == [None]
    assert accuracy([PLAIN], ["<think>r</think>4"], solution=["4"]) == [1.0]
    assert accuracy([OPENED], ["r</think>4"], answer=["4"]) == [1.0]
    assert not answers_match("", "4")


def test_soft_overlong_penalty():
    length = soft_overlong(100, 20)
    ids = [[0] * n for n in (10, 80, 90, 100, 120)]
    assert length(completion_ids=ids) == [0.0, 0.0, -0.5, -1.0, -1.0]
    with pytest.raises(UserError, match="buffer"):
        soft_overlong(100, 0)


def test_user_reward_file_with_trl_convention(tmp_path):
    file = tmp_path / "my_rewards.py"
    file.write_text("def brevity(prompts, completions, completion_ids, answer, **kwargs):\n"
                    "    return [1.0 / (1 + len(ids)) if a else None for ids, a in zip(completion_ids, answer)]\n"
                    "def broken(completions, **kwargs):\n"
                    "    return [1.0]\n"
                    "def wordy(completions, **kwargs):\n"
                    "    return ['good' for _ in completions]\n"
                    "def crash(completions, **kwargs):\n"
                    "    raise KeyError('solution')\n")
    inputs = {"prompts": [PLAIN] * 2, "completions": ["a", "b"], "completion_ids": [[1], [1, 2, 3]],
              "answer": ["x", None]}
    values = call_reward(load_reward_func(f"{file}:brevity"), 2, **inputs)
    assert values[0] == 0.5 and math.isnan(values[1])
    with pytest.raises(UserError, match=r"^reward function 'broken' returned 1 values for 2 completions"):
        call_reward(load_reward_func(f"{file}:broken"), 2, **inputs)
    with pytest.raises(UserError, match=r"^reward function 'wordy' returned 'good' for completion 0"):
        call_reward(load_reward_func(f"{file}:wordy"), 2, **inputs)
    with pytest.raises(UserError, match=r"^reward function 'crash' raised KeyError: 'solution'"):
        call_reward(load_reward_func(f"{file}:crash"), 2, **inputs)


def test_reward_specs_that_cannot_load_are_one_line_errors(tmp_path):
    assert load_reward_func("think_format") is think_format
    assert load_reward_func("r1tune.train.rewards:accuracy") is accuracy
    with pytest.raises(UserError, match="does not exist"):
        load_reward_func(f"{tmp_path}/missing.py:f")
    with pytest.raises(UserError, match="cannot import module 'no_such_module'"):
        load_reward_func("no_such_module:f")
    with pytest.raises(UserError, match="has no function 'nope'"):
        load_reward_func("r1tune.train.rewards:nope")
    with pytest.raises(UserError, match="neither a built-in reward"):
        load_reward_func("thinkformat")
    (tmp_path / "bad.py").write_text("import no_such_module\n")
    with pytest.raises(UserError, match="loading .*bad.py' failed: ModuleNotFoundError"):
        load_reward_func(f"{tmp_path}/bad.py:f")


def test_combine_weights_and_skips_abstentions():
    total = combine([[1.0, math.nan, math.nan], [0.5, 0.5, math.nan]], [2.0, 1.0])
    assert total[:2] == [2.5, 0.5] and math.isnan(total[2])
    with pytest.raises(UserError, match="'reward_weights' has 1 weights for 2 reward functions"):
        combine([[1.0], [1.0]], [1.0])


def test_trl_reward_functions_run_unchanged():
    rewards = pytest.importorskip("trl.rewards")
    completions = [[{"role": "assistant", "content": "<think>r</think>a"}], [{"role": "assistant", "content": "a"}]]
    assert call_reward(rewards.think_format_reward, 2, prompts=[PLAIN] * 2, completions=completions,
                       completion_ids=[[1], [1]]) == [1.0, 0.0]
