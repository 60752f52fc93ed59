"""Seeded perturbations of evaluation prompts, for "accuracy under perturbation" reports.

`perturb_prompts(prompts, kinds, seed, rate)` returns, for each kind, a perturbed copy of
the prompt list; `perturb_text(text, kind, rng, rate)` perturbs one text. Kinds:

- typos: each Latin word of 3+ letters, with probability `rate`, gets two adjacent inner
  letters swapped or one inner letter dropped or doubled (the first and last letters stay,
  as in natural typos). Chinese has no words to misspell, so CJK runs are cut into
  two-character pieces and each piece, with probability `rate`, has its characters swapped.
- synonyms: each word or phrase found in the bundled EN/ZH synonym tables is replaced with
  probability `rate` by another member of its group (the training augmenter's matching:
  greedy longest match, names and ALL-CAPS words left alone).
- char_noise: each letter (CJK character) is, with probability `rate`, deleted, replaced,
  or followed by an inserted random character of the text's script.
- distractor: one irrelevant sentence in the text's language, appended or prepended
  (seeded choice); `rate` is ignored, so it always adds exactly one sentence.

What is never changed, reusing `r1tune.data.augment`'s masking: numbers (also digits inside
words, and numeral characters such as 三 or ５, since they often carry the answer),
`<think>…</think>` reasoning, special tokens such as `<｜User｜>` and other tags, code,
URLs and e-mail addresses. The result depends only on (text, kind, rng state, rate).
"""

from __future__ import annotations

import functools
import random
import re
import string
from dataclasses import dataclass

from r1tune.data.augment import (_CJK_CHAR, AugmentOptions, Augmenter, _en_tokens, _mask, _mostly_cjk,
                                 _rng, _unmask)
from r1tune.errors import UserError, did_you_mean

PERTURBATIONS = ("typos", "synonyms", "char_noise", "distractor")

DISTRACTORS_EN = (
    "The weather was pleasant this morning.",
    "Some people prefer tea to coffee.",
    "The library closes early on holidays.",
    "Cats often sleep for most of the day.",
    "A new bakery opened near the station.",
    "The river looks calm after the rain.",
    "Many birds migrate south in autumn.",
    "The museum has a large collection of old maps.",
    "She painted the fence a bright green.",
    "The train was a little late today.",
)
DISTRACTORS_ZH = (
    "今天早上的天气很好。",
    "有些人喜欢喝茶而不是咖啡。",
    "图书馆在节假日会提前关门。",
    "猫常常一整天都在睡觉。",
    "车站附近新开了一家面包店。",
    "雨后的河面显得很平静。",
    "许多鸟在秋天飞往南方。",
    "博物馆收藏了很多古老的地图。",
    "她把篱笆刷成了鲜绿色。",
    "今天的火车晚点了一会儿。",
)
# Noise characters of each script; no numerals, so noise never adds a number.
_NOISE_EN = string.ascii_lowercase
_NOISE_ZH = "的是在了有和人这中大为上个我以要他时来用们生到作地出就分对成会可主发动同工也能下过子说产"
_LATIN_WORD = re.compile(r"[A-Za-z]{3,}")
# Whitespace and hard-span placeholders (<think>, special tokens) at either end of a masked text.
_LEAD = re.compile(r"(?:\s|[\U00100000-\U0010FFFF])*")
_TRAIL = re.compile(r"(?:\s|[\U00100000-\U0010FFFF])*\Z")


@dataclass
class Perturbation:
    kind: str
    rate: float = 0.1


def _check(kind: str, rate: float) -> None:
    if kind not in PERTURBATIONS:
        raise UserError(f"unknown perturbation {kind!r}{did_you_mean(str(kind), PERTURBATIONS)}; "
                        f"use one of {', '.join(PERTURBATIONS)}")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
        raise UserError(f"perturbation rate {rate!r} for {kind} is not a number from 0 to 1; pick a share such as 0.1")


def perturb_text(text: str, kind: str, rng: random.Random, rate: float = 0.1) -> str:
    """A perturbed copy of `text`; protected spans (numbers, <think>, special tokens) are kept."""
    _check(kind, rate)
    masked = _mask(text)
    if masked is None or (rate == 0 and kind != "distractor"):
        return text
    body, originals = masked
    zh = _mostly_cjk(body)
    body = {"typos": _typos, "synonyms": _synonyms, "char_noise": _char_noise,
            "distractor": _distractor}[kind](body, rng, rate, zh)
    return _unmask(body, originals)


def _typos(body: str, rng: random.Random, rate: float, zh: bool) -> str:
    out = []
    for tok in _en_tokens(body):  # numbers are placeholders here, so never words
        word = tok.text
        if tok.kind == "w" and _LATIN_WORD.fullmatch(word) and rng.random() < rate:
            word = _latin_typo(word, rng)
        elif tok.kind == "w" and _CJK_CHAR.match(word):
            pieces = [word[i:i + 2] for i in range(0, len(word), 2)]
            word = "".join(p[::-1] if len(p) == 2 and not _numeral(p) and rng.random() < rate else p
                           for p in pieces)
        out.append(word)
    return "".join(out)


def _latin_typo(word: str, rng: random.Random) -> str:
    i = rng.randrange(1, len(word) - 1)  # an inner letter
    op = rng.choice(("swap", "drop", "double"))
    if op == "swap" and i + 1 < len(word) - 1 and word[i] != word[i + 1]:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if op == "drop":
        return word[:i] + word[i + 1:]
    return word[:i] + word[i] + word[i:]  # double; also the fallback for an impossible swap


def _numeral(s: str) -> bool:
    return any(c.isnumeric() for c in s)


@functools.lru_cache(maxsize=8)
def _synonym_augmenter(rate: float) -> Augmenter:
    return Augmenter(AugmentOptions(synonym_prob=rate), source="perturbation")


def _synonyms(body: str, rng: random.Random, rate: float, zh: bool) -> str:
    augmenter = _synonym_augmenter(float(rate))
    return augmenter._augment_zh(body, rng) if zh else augmenter._augment_en(body, rng)


def _char_noise(body: str, rng: random.Random, rate: float, zh: bool) -> str:
    alphabet, out = _NOISE_ZH if zh else _NOISE_EN, []
    for char in body:
        # Only letters: placeholders, digits, numerals, spaces and punctuation stay put.
        if not char.isalpha() or char.isnumeric() or rng.random() >= rate:
            out.append(char)
            continue
        op = rng.choice(("insert", "delete", "replace"))
        if op == "insert":
            out.append(char + rng.choice(alphabet))
        elif op == "replace":
            out.append(rng.choice([c for c in alphabet if c != char.lower()]))
    return "".join(out)


def _distractor(body: str, rng: random.Random, rate: float, zh: bool) -> str:
    sentence = rng.choice(DISTRACTORS_ZH if zh else DISTRACTORS_EN)
    head = _LEAD.match(body).end()  # keep the sentence inside the user's text, not before <｜User｜>
    tail = _TRAIL.search(body, head).start()
    core, sep = body[head:tail], "" if zh else " "
    core = f"{sentence}{sep}{core}" if rng.random() < 0.5 else f"{core}{sep}{sentence}"
    return body[:head] + core.strip() + body[tail:]


def perturb_prompts(prompts: list[str], kinds=PERTURBATIONS, seed: int = 0,
                    rate: float = 0.1) -> dict[str, list[str]]:
    """kind -> perturbed copy of `prompts`; a kind may be a name or a Perturbation with its own rate."""
    if isinstance(kinds, (str, Perturbation)):
        kinds = [kinds]
    specs = [k if isinstance(k, Perturbation) else Perturbation(k, rate) for k in kinds]
    for spec in specs:
        _check(spec.kind, spec.rate)
    # One RNG per (seed, kind, prompt): adding a kind or a prompt leaves the other copies unchanged.
    return {spec.kind: [perturb_text(p, spec.kind, _rng(seed, spec.kind, i), spec.rate)
                        for i, p in enumerate(prompts)] for spec in specs}
