"""Text-generation metrics (r1tune.data.metrics) against sacrebleu, rouge-score and hand-computed values."""

from __future__ import annotations

import math

import pytest
import sacrebleu
from rouge_score import rouge_scorer
from sacrebleu.tokenizers.tokenizer_zh import TokenizerZh

from r1tune.data.metrics import (
    accuracy,
    bleu4,
    exact_match,
    f1_scores,
    reasoning_tokens,
    rouge_l,
    sentence_bleu4,
    tokenize_for_metrics,
)

ENGLISH = (
    ["The cat sat on the mat.", "It's 3.5 degrees, and rising -- quickly!", "He said \"hello\" to (almost) everyone.",
     "Results: 1,000 runs in 2019-2020; loss=0.25"],
    ["The cat is sitting on the mat.", "It is 3.5 degrees and rising quickly!", "He said hello to everyone.",
     "Results: 1,000 runs in 2019-2021; loss = 0.25"],
)
CHINESE = (
    ["今天天气很好，我们去公园散步吧。", "他在北京大学学习计算机科学。", "这本书非常有意思！", "答案是四十二"],
    ["今天天气不错，我们去公园散步。", "他在清华大学学习计算机。", "这本书很有趣。", "答案是四十二"],
)
MIXED = (
    ["我用Python 3.10写了一个web server，运行在port 8080上。", "The answer is 42。因为6×7=42.",
     "模型GPT-4的accuracy是95.5%", "“引号”和…省略号 (brackets) 都是token"],
    ["我用 Python 3.11 写了一个 web 服务器，运行在 8080 端口上。", "答案是 42，because 6×7=42.",
     "GPT-4 模型的准确率是 95.5%", "“引号”和…省略号(括号)都是 token"],
)


def _sacre(preds: list[str], refs: list[str]) -> float:
    return sacrebleu.corpus_bleu(preds, [refs], tokenize="zh").score / 100


# --- tokenisation ---------------------------------------------------------------------------

def test_tokenize_mixed_text():
    assert tokenize_for_metrics("我用Python 3.10写了web-server，共1,000行!") == [
        "我", "用", "Python", "3.10", "写", "了", "web-server", "，", "共", "1,000", "行", "!"]
    assert tokenize_for_metrics("Hello, world. (x+y)=z") == ["Hello", ",", "world", ".", "(", "x", "+", "y", ")", "=", "z"]
    assert tokenize_for_metrics("  ") == []


@pytest.mark.parametrize("texts", [ENGLISH, CHINESE, MIXED], ids=["en", "zh", "mixed"])
def test_tokenize_matches_sacrebleu_zh(texts):
    zh = TokenizerZh()
    for text in texts[0] + texts[1]:
        assert tokenize_for_metrics(text) == zh(text).split()


def test_tokenize_keeps_sacrebleu_zh_quirks():
    # Stripped, not padded: a period after a final digit stays attached (13a would split it).
    # Surrounding whitespace does not change that.
    assert tokenize_for_metrics("x is 5.") == tokenize_for_metrics(" x is 5.\n") == ["x", "is", "5."]
    assert tokenize_for_metrics(" .5 x") == TokenizerZh()(" .5 x").split() == [".5", "x"]
    # sacrebleu's mis-typed Extension B range makes general punctuation single tokens ...
    assert tokenize_for_metrics("a—b“c”") == ["a", "—", "b", "“", "c", "”"]
    # ... and leaves real Extension B ideographs unsplit.
    assert tokenize_for_metrics("a\U00020000b") == ["a\U00020000b"]


# --- BLEU -----------------------------------------------------------------------------------

@pytest.mark.parametrize("texts", [ENGLISH, CHINESE, MIXED], ids=["en", "zh", "mixed"])
def test_bleu4_matches_sacrebleu(texts):
    preds, refs = texts
    ours = bleu4(preds, refs)
    assert 0.0 < ours < 1.0
    assert ours == pytest.approx(_sacre(preds, refs), abs=1e-6)
    for p, r in zip(preds, refs):
        assert bleu4([p], [r]) == pytest.approx(_sacre([p], [r]), abs=1e-6)
        assert sentence_bleu4(p, r) == pytest.approx(sacrebleu.sentence_bleu(p, [r], tokenize="zh").score / 100, abs=1e-6)


def test_bleu4_hand_computed():
    pred, ref = "the cat sat on the mat", "the cat is on the mat"
    # 1-grams: the x2, cat, on, mat match -> 5/6; 2-grams: "the cat", "on the", "the mat" -> 3/5;
    # 3-grams: "on the mat" -> 1/4; 4-grams: 0/3, exp smoothing (first zero) -> 1/(2*3);
    # equal lengths -> brevity penalty 1.
    assert bleu4([pred], [ref]) == pytest.approx((5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25, abs=1e-12)

    short, full = "the cat sat on the", "the cat sat on the mat"
    # All n-grams match (5/5, 4/4, 3/3, 2/2); 5 tokens against 6 -> BP = exp(1 - 6/5).
    assert bleu4([short], [full]) == pytest.approx(math.exp(1 - 6 / 5), abs=1e-12)

    # Corpus BLEU sums statistics: matches 10/11, 7/9, 4/7, 2/5; lengths 11 vs 12.
    expected = math.exp(1 - 12 / 11) * (10 / 11 * 7 / 9 * 4 / 7 * 2 / 5) ** 0.25
    assert bleu4([pred, short], [ref, full]) == pytest.approx(expected, abs=1e-12)
    assert bleu4([pred, short], [ref, full]) == pytest.approx(_sacre([pred, short], [ref, full]), abs=1e-6)


def test_bleu4_edge_cases():
    assert bleu4(["a b c d e"], ["a b c d e"]) == pytest.approx(1.0)
    assert bleu4(["x y z w"], ["a b c d"]) == 0.0
    # Corpus BLEU with no 4-grams at all is 0 (as sacrebleu); sentence BLEU uses effective order.
    assert bleu4(["the cat sat"], ["the cat sat"]) == 0.0 == _sacre(["the cat sat"], ["the cat sat"])
    assert sentence_bleu4("the cat sat", "the cat sat") == pytest.approx(1.0)
    assert bleu4([""], ["a b c d"]) == 0.0
    with pytest.raises(ValueError):
        bleu4(["a"], ["a", "b"])


# --- ROUGE-L --------------------------------------------------------------------------------

class _Whitespace:
    """rouge-score tokenizer that splits on whitespace only (its default drops every CJK character)."""

    def tokenize(self, text: str) -> list[str]:
        return text.split()


def _rouge_ready(text: str) -> str:
    """Our tokens, lowercased, keeping only ASCII alphanumeric ones, space-joined.

    rouge-score's default tokenizer lowercases and turns non-[a-z0-9] into spaces; on
    this string it yields exactly our tokens, so both implementations score the same tokens.
    """
    return " ".join(t for t in tokenize_for_metrics(text.lower()) if t.isascii() and t.isalnum())


def _reference_rouge_l(preds, refs, tokenizer=None) -> float:
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=tokenizer)
    return sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)) / len(preds)


def test_rouge_l_matches_rouge_score_english():
    preds, refs = ([_rouge_ready(t) for t in texts] for texts in ENGLISH)
    default = rouge_scorer.RougeScorer(["rougeL"])._tokenizer
    for text in preds + refs:
        assert default.tokenize(text) == tokenize_for_metrics(text)
    ours = rouge_l(preds, refs)
    assert 0.0 < ours < 1.0
    assert ours == pytest.approx(_reference_rouge_l(preds, refs), abs=1e-6)


def test_rouge_l_matches_rouge_score_chinese():
    preds, refs = CHINESE
    spaced = ([" ".join(t) for t in texts] for texts in CHINESE)  # one token per character
    expected = _reference_rouge_l(*spaced, tokenizer=_Whitespace())
    assert rouge_l(preds, refs) == pytest.approx(expected, abs=1e-6)


def test_rouge_l_hand_computed():
    # LCS("the cat sat on the mat", "the cat on mat today") = "the cat on mat" = 4;
    # P = 4/5, R = 4/6, F1 = 2PR/(P+R) = 2*4/(5+6).
    assert rouge_l(["the cat on mat today"], ["the cat sat on the mat"]) == pytest.approx(8 / 11, abs=1e-12)
    # LCS("我在北京", "我爱北京天安门") = 我北京 = 3 -> 2*3/(4+7); the mean over two pairs with a perfect one.
    assert rouge_l(["我在北京", "好"], ["我爱北京天安门", "好"]) == pytest.approx((6 / 11 + 1) / 2, abs=1e-12)
    assert rouge_l([""], ["a"]) == 0.0


# --- classification and matching ------------------------------------------------------------

GOLD = ["a", "a", "b", "c", "c", "c"]
PRED = ["a", "b", "b", "c", "c", "d"]


def test_f1_hand_computed():
    # Per class (tp, fp, fn) -> 2tp/(2tp+fp+fn): a (1,0,1) 2/3, b (1,1,0) 2/3, c (2,0,1) 4/5, d (0,1,0) 0.
    scores = f1_scores(PRED, GOLD)
    assert scores["f1_macro"] == pytest.approx((2 / 3 + 2 / 3 + 4 / 5 + 0) / 4, abs=1e-12)
    # Micro: tp 4, fp 2, fn 2 -> 8/12, equal to accuracy for single-label data.
    assert scores["f1_micro"] == pytest.approx(8 / 12, abs=1e-12)
    assert accuracy(PRED, GOLD) == pytest.approx(4 / 6)


def test_f1_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    labels = sorted(set(GOLD) | set(PRED))
    scores = f1_scores(PRED, GOLD)
    for average in ("macro", "micro"):
        expected = metrics.f1_score(GOLD, PRED, labels=labels, average=average)
        assert scores[f"f1_{average}"] == pytest.approx(expected, abs=1e-9)


def test_accuracy_and_exact_match():
    assert accuracy([1, 2, 3], [1, 2, 4]) == pytest.approx(2 / 3)
    assert accuracy([], []) == 0.0
    with pytest.raises(ValueError):
        accuracy([1], [1, 2])
    preds = ["  Hello   world\n", "a b", "A", "4 2"]
    refs = ["Hello world", "a\tb ", "a", "42"]
    assert exact_match(preds, refs) == pytest.approx(2 / 4)  # case and inner spaces between characters count


# --- R1 outputs and perplexity --------------------------------------------------------------

@pytest.mark.parametrize("text, prompt, expected", [
    ("<think>\nstep 1\n</think>\n\n42", "Q", "42"),
    ("step 1</think>42", "Q<think>\n", "42"),  # the prompt opened <think>
    ("just 42", "Q", "just 42"),
    ("<think>still thinking", "Q", ""),
    ("a</think>b</think> c", "Q<think>\n", "b</think> c"),  # the first </think> ends the reasoning, as in serve
    ("", "Q", ""),
])
def test_answer_is_what_chat_and_serve_show(text, prompt, expected):
    from r1tune.data.reasoning import split_output
    from r1tune.models.generate import answer_of

    assert answer_of(text, prompt) == expected
    assert answer_of(text, prompt) == split_output(text, prompt.endswith("<think>\n"))[1]


def test_reasoning_tokens():
    assert reasoning_tokens("<think>我想 think about it.</think>答案") == 6  # 我 想 think about it .
    assert reasoning_tokens("no reasoning here") == 0


def test_perplexity():
    from r1tune.train.held_out import perplexity

    assert perplexity(2.5) == pytest.approx(math.exp(2.5))
    assert perplexity(0.0) == 1.0
    assert perplexity(1e6) == math.exp(50.0)  # capped: JSON and plots stay finite
