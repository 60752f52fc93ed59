import random
import re

import pytest

from r1tune.data.augment import bundled_table
from r1tune.errors import UserError
from r1tune.evaluation.robustness import (DISTRACTORS_EN, DISTRACTORS_ZH, PERTURBATIONS, Perturbation,
                                          perturb_prompts, perturb_text)

EN = "Is 4827 even or odd? Please give a quick answer and explain the big question."
ZH = "4827是奇数还是偶数？请快速回答，并解释目前的问题。"
LONG_EN = " ".join(["Please explain whether the quick brown animal jumped over the lazy sleeping creature"] * 30)
LONG_ZH = "请你仔细阅读下面这段文字然后回答问题我们今天讨论天气变化对农业生产的影响" * 10
CJK = re.compile(r"[\u4e00-\u9fff]")


def digits(text):
    return re.findall(r"\d+", text)


@pytest.mark.parametrize("kind", PERTURBATIONS)
@pytest.mark.parametrize("text", [EN, ZH])
def test_same_seed_same_copy_and_seeds_differ(kind, text):
    prompts = [text, LONG_EN, LONG_ZH]
    first = perturb_prompts(prompts, kinds=[kind], seed=3, rate=0.5)
    assert first == perturb_prompts(prompts, kinds=[kind], seed=3, rate=0.5)
    others = [perturb_prompts(prompts, kinds=[kind], seed=s, rate=0.5) for s in range(4, 8)]
    assert any(o != first for o in others)


@pytest.mark.parametrize("kind", PERTURBATIONS)
@pytest.mark.parametrize("text", [EN, ZH, "Is 4827 even or odd?", "4827是奇数还是偶数？"])
def test_digits_preserved(kind, text):
    for seed in range(20):
        out = perturb_text(text, kind, random.Random(seed), rate=1.0)
        assert digits(out) == digits(text) == ["4827"]


@pytest.mark.parametrize("kind", ["typos", "synonyms", "char_noise"])
@pytest.mark.parametrize("text", [EN, ZH, LONG_EN])
def test_rate_zero_is_identity(kind, text):
    assert perturb_text(text, kind, random.Random(0), rate=0.0) == text


@pytest.mark.parametrize("text,pool", [(EN, DISTRACTORS_EN), (ZH, DISTRACTORS_ZH)])
def test_distractor_adds_one_sentence_of_the_language_at_either_end(text, pool):
    ends = set()
    for seed in range(20):
        out = perturb_text(text, "distractor", random.Random(seed), rate=0.0)
        added = [s for s in pool if s in out]
        assert len(added) == 1 and out.replace(added[0], "").strip() == text
        ends.add(out.startswith(added[0]))
    assert ends == {True, False}


def test_synonyms_use_bundled_table():
    table = bundled_table()
    out = perturb_text("Please give a quick answer.", "synonyms", random.Random(0), rate=1.0)
    assert out != "Please give a quick answer."
    assert out.split()[3] in table.alternatives("quick")
    zh = perturb_text("请快速回答", "synonyms", random.Random(0), rate=1.0)
    assert zh.startswith("请") and zh[1:3] in table.alternatives("快速")


def _changed_share(original, perturbed):
    a, b = original.split(), perturbed.split()
    assert len(a) == len(b)
    return sum(x != y for x, y in zip(a, b)) / len(a)


@pytest.mark.parametrize("rate", [0.1, 0.3])
def test_changed_share_matches_rate_en(rate):
    typos = perturb_text(LONG_EN, "typos", random.Random(1), rate=rate)
    assert abs(_changed_share(LONG_EN, typos) - rate) < 0.07  # every word here has 3+ letters
    noise = perturb_text(LONG_EN, "char_noise", random.Random(1), rate=rate)
    letters = sum(c.isalpha() for c in LONG_EN)
    changed = sum(a != b for a, b in zip(LONG_EN, noise)) + abs(len(LONG_EN) - len(noise))
    assert changed > 0.3 * rate * letters  # a shift after insert/delete changes many positions
    assert abs(len(noise) - len(LONG_EN)) < 0.2 * rate * letters  # inserts and deletes roughly balance


def test_typos_zh_swap_share_and_keep_language():
    out = perturb_text(LONG_ZH, "typos", random.Random(2), rate=0.3)
    assert sorted(out) == sorted(LONG_ZH) and len(CJK.findall(out)) == len(LONG_ZH)
    pieces = [(LONG_ZH[i:i + 2], out[i:i + 2]) for i in range(0, len(LONG_ZH), 2)]
    share = sum(a != b for a, b in pieces) / len(pieces)
    assert abs(share - 0.3) < 0.1


@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_language_kept(kind):
    for seed in range(5):
        en = perturb_text(EN, kind, random.Random(seed), rate=0.5)
        zh = perturb_text(ZH, kind, random.Random(seed), rate=0.5)
        assert not CJK.search(en)
        assert len(CJK.findall(zh)) >= len(CJK.findall(ZH)) - 2 and not re.search("[A-Za-z]", zh)


def test_kinds_use_independent_rngs():
    prompts = [EN, ZH, LONG_EN]
    alone = perturb_prompts(prompts, kinds=["synonyms"], seed=5, rate=0.5)
    together = perturb_prompts(prompts, kinds=PERTURBATIONS, seed=5, rate=0.5)
    reordered = perturb_prompts(prompts, kinds=list(reversed(PERTURBATIONS)), seed=5, rate=0.5)
    assert together["synonyms"] == alone["synonyms"]
    assert together == reordered and set(together) == set(PERTURBATIONS)


def test_perturbation_objects_carry_their_own_rate():
    out = perturb_prompts([LONG_EN], kinds=[Perturbation("typos", 0.0), Perturbation("char_noise", 0.2)], seed=1)
    assert out["typos"] == [LONG_EN] and out["char_noise"] != [LONG_EN]


def test_protected_spans_untouched():
    text = "<｜User｜>Please explain the quick answer<｜Assistant｜><think>\nthe quick answer is big</think>"
    for kind in PERTURBATIONS:
        for seed in range(10):
            out = perturb_text(text, kind, random.Random(seed), rate=1.0)
            assert out.startswith("<｜User｜>")
            assert out.endswith("<｜Assistant｜><think>\nthe quick answer is big</think>")


def test_unknown_kind_and_bad_rate():
    with pytest.raises(UserError, match="typos, synonyms, char_noise, distractor"):
        perturb_text(EN, "typo", random.Random(0))
    with pytest.raises(UserError, match="did you mean 'typos'"):
        perturb_prompts([EN], kinds=["typo"])
    with pytest.raises(UserError, match="0 to 1"):
        perturb_text(EN, "typos", random.Random(0), rate=1.5)
