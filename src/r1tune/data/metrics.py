"""Text-generation metrics: BLEU-4, ROUGE-L, exact match, accuracy, F1 (perplexity: r1tune.train.held_out).

Own implementations with no runtime dependency on sacrebleu, rouge-score or jieba;
tests/test_metrics.py checks them against those libraries.

Tokenisation (`tokenize_for_metrics`) is sacrebleu's "zh" tokenizer: every CJK
character is its own token (no word segmentation, so no jieba) and the rest is
split like sacrebleu's 13a tokenizer. Character tokens are the usual choice for
Chinese BLEU and work unchanged on mixed Chinese/English text, and using one
tokenizer for every metric makes BLEU and ROUGE-L comparable. Tokens are case
sensitive, as in sacrebleu's default.

Scores are fractions in [0, 1] (sacrebleu reports BLEU as 0-100).

A metric that cannot say anything on the data is `NotApplicable(reason)` instead of a number
(`not_applicable` has the rules); reports show it as "n/a (reason)" and JSON as null.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

from r1tune.data.reasoning import split_output

MAX_ORDER = 4

# The code points sacrebleu's zh tokenizer treats as CJK, as it actually behaves.
# Its table writes the supplementary-plane ranges as '\u20000'..'\u2a6d6' and
# '\u2f800'..'\u2fa1d', which Python reads as two-character strings; compared
# with one character they select U+2001..U+2A6D and U+2F81..U+2FA1 instead. We
# keep that behaviour so scores match sacrebleu: general punctuation (curly
# quotes, dashes, ellipsis), arrows and symbols become single tokens, while
# Extension B+ ideographs (U+20000 and up) are not split.
_CJK_RANGES = (
    (0x2001, 0x2A6D),  # sacrebleu's mis-read Extension B range (covers U+2600-U+27BF too)
    (0x2E80, 0x2EFF),  # CJK radicals supplement
    (0x2F00, 0x2FDF),  # Kangxi radicals
    (0x2FF0, 0x2FFF),  # ideographic description characters
    (0x3000, 0x303F),  # CJK punctuation
    (0x3100, 0x312F),  # bopomofo
    (0x31A0, 0x31BF),  # bopomofo extended
    (0x31C0, 0x31EF),  # CJK strokes
    (0x3200, 0x33FF),  # enclosed CJK letters, CJK compatibility
    (0x3400, 0x4DB5),  # Extension A
    (0x4E00, 0x9FBB),  # unified ideographs
    (0xF900, 0xFA2D),  # compatibility ideographs
    (0xFA30, 0xFA6A),
    (0xFA70, 0xFAD9),
    (0xFE10, 0xFE1F),  # vertical forms
    (0xFE30, 0xFE4F),  # CJK compatibility forms
    (0xFF00, 0xFFEF),  # full-width ASCII and punctuation, half-width forms
)
_CJK = re.compile("[" + "".join(f"\\u{a:04x}-\\u{b:04x}" for a, b in _CJK_RANGES) + "]")

# sacrebleu's 13a/"re" rules, in its order (each rule sees the previous one's output).
_13A_RULES = (
    # ASCII symbols except ' - . , and alphanumerics: { | } ~ [ \ ] ^ _ ` space ! " # $ % & ( ) * + : ; < = > ? @ /
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # period and comma, unless after a digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # ... or unless before a digit (3.5, 1,000)
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # dash after a digit (ranges such as 3-5)
)


def tokenize_for_metrics(text: str) -> list[str]:
    """Metric tokens: each CJK character alone, other text split like sacrebleu's 13a.

    Like sacrebleu's zh tokenizer (and unlike its 13a one) the text is stripped but
    not padded first, so a period after a digit at the very end stays attached
    ("is 5." -> "is", "5.") and one at the very start before a digit too (".5").
    """
    text = _CJK.sub(r" \g<0> ", text.strip())
    for pattern, repl in _13A_RULES:
        text = pattern.sub(repl, text)
    return text.split()


@dataclass(frozen=True)
class NotApplicable:
    """A metric that does not apply to this data, with a short reason (shown as "n/a (reason)")."""

    reason: str

    def __str__(self) -> str:
        return f"n/a ({self.reason})"


BLEU_SHORT = "references under 4 tokens"
ROUGE_EMPTY = "references are empty"
ONE_LABEL = "references hold one label"


def not_applicable(references: list[str]) -> dict[str, NotApplicable]:
    """The text metrics that cannot say anything about answers to these references, with the reason.

    - bleu4, when no reference has 4 metric tokens (`tokenize_for_metrics`; a CJK character is one):
      the corpus then has no reference 4-gram, so the 4-gram precision is 0 (or a smoothing
      constant) whatever the answers are, and answers identical to the references score 0.
      One reference of 4+ tokens is enough for identical answers to score 1, so BLEU-4 applies.
    - rouge_l, when every reference is empty: F1 is 0 for any answer.
    - f1_macro, when all references are one label: the macro mean then averages that label's F1
      with a 0 for every other answer the model gave, measuring how varied the mistakes are rather
      than how many there are (accuracy, equal to f1_micro here, is the measure).
    """
    tokens = [tokenize_for_metrics(r) for r in references]
    out = {}
    if tokens and all(len(t) < MAX_ORDER for t in tokens):
        out["bleu4"] = NotApplicable(BLEU_SHORT)
    if tokens and not any(tokens):
        out["rouge_l"] = NotApplicable(ROUGE_EMPTY)
    if len(set(references)) == 1:
        out["f1_macro"] = NotApplicable(ONE_LABEL)
    return out


def _check_pairs(predictions: list, references: list) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _bleu_stats(prediction: str, reference: str) -> tuple[int, int, list[int], list[int]]:
    """(prediction length, reference length, clipped matches per order, n-grams per order)."""
    hyp, ref = tokenize_for_metrics(prediction), tokenize_for_metrics(reference)
    correct, total = [], []
    for n in range(1, MAX_ORDER + 1):
        hyp_n, ref_n = _ngrams(hyp, n), _ngrams(ref, n)
        correct.append(sum(min(c, ref_n[g]) for g, c in hyp_n.items()))
        total.append(sum(hyp_n.values()))
    return len(hyp), len(ref), correct, total


def _bleu(sys_len: int, ref_len: int, correct: list[int], total: list[int], effective_order: bool) -> float:
    """BLEU from sufficient statistics with sacrebleu's default "exp" smoothing.

    "exp" (mteval-v13a's) smoothing replaces the k-th zero match count by 1/2**k,
    so one missing order does not zero the score. An order with no n-grams at all
    (every prediction shorter than n) gives 0, unless `effective_order`, which
    averages only the orders the prediction is long enough to have (sentence BLEU).
    """
    if not any(correct):
        return 0.0
    bp = 1.0 if sys_len >= ref_len else (math.exp(1 - ref_len / sys_len) if sys_len else 0.0)
    log_p, halvings = [], 0
    for c, t in zip(correct, total):
        if t == 0:
            break
        if c == 0:
            halvings += 1
        log_p.append(math.log(c / t) if c else -math.log(2 ** halvings * t))
    if len(log_p) < MAX_ORDER and not effective_order:
        return 0.0
    return bp * math.exp(sum(log_p) / len(log_p))


def bleu4(predictions: list[str], references: list[str]) -> float:
    """Corpus BLEU-4 in [0, 1], one reference per prediction.

    Same as sacrebleu.corpus_bleu(predictions, [references], tokenize="zh").score / 100:
    matches and lengths are summed over the corpus before precisions and the
    brevity penalty are taken, with uniform weights and "exp" smoothing (the
    smooth_method sacrebleu's corpus_bleu defaults to).
    """
    _check_pairs(predictions, references)
    sys_len = ref_len = 0
    correct, total = [0] * MAX_ORDER, [0] * MAX_ORDER
    for pred, ref in zip(predictions, references):
        h, r, c, t = _bleu_stats(pred, ref)
        sys_len, ref_len = sys_len + h, ref_len + r
        correct = [a + b for a, b in zip(correct, c)]
        total = [a + b for a, b in zip(total, t)]
    return _bleu(sys_len, ref_len, correct, total, effective_order=False)


def sentence_bleu4(prediction: str, reference: str) -> float:
    """Sentence BLEU-4 in [0, 1], as sacrebleu.sentence_bleu(..., tokenize="zh").score / 100.

    Uses sacrebleu's sentence defaults: "exp" smoothing and effective order, so a
    prediction shorter than 4 tokens is scored on the orders it has.
    """
    h, r, c, t = _bleu_stats(prediction, reference)
    return _bleu(h, r, c, t, effective_order=True)


def _lcs_length(a: list[str], b: list[str]) -> int:
    """Longest common subsequence length, one DP row at a time."""
    prev = [0] * (len(b) + 1)
    for x in a:
        row = [0]
        for j, y in enumerate(b):
            row.append(prev[j] + 1 if x == y else max(prev[j + 1], row[j]))
        prev = row
    return prev[-1]


def rouge_l_f1(prediction: str, reference: str) -> float:
    hyp, ref = tokenize_for_metrics(prediction), tokenize_for_metrics(reference)
    lcs = _lcs_length(ref, hyp)
    if lcs == 0:  # also covers an empty side, scored 0 like rouge-score
        return 0.0
    precision, recall = lcs / len(hyp), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean sentence-level ROUGE-L F1 (beta = 1, rouge-score's fmeasure) over metric tokens.

    Unlike rouge-score's default tokenizer, which lowercases and drops everything
    but [a-z0-9] (so all Chinese text), this keeps case, punctuation and CJK characters.
    """
    _check_pairs(predictions, references)
    if not predictions:
        return 0.0
    return sum(map(rouge_l_f1, predictions, references)) / len(predictions)


def _normalise(text: str) -> str:
    return " ".join(text.split())


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Fraction equal after stripping and collapsing whitespace runs to one space."""
    _check_pairs(predictions, references)
    return accuracy([_normalise(p) for p in predictions], [_normalise(r) for r in references])


def accuracy(predictions: list, labels: list) -> float:
    """Fraction of predictions equal to their label; 0.0 for no examples."""
    _check_pairs(predictions, labels)
    return sum(p == g for p, g in zip(predictions, labels)) / len(labels) if labels else 0.0


def f1_scores(predictions: list, labels: list) -> dict[str, float]:
    """Macro and micro F1 over gold ∪ predicted labels, as sklearn's f1_score with labels= that set.

    A label only ever predicted counts in the macro mean with F1 0, which penalises
    invented labels. For single-label data micro F1 equals accuracy.
    """
    _check_pairs(predictions, labels)
    classes = dict.fromkeys([*labels, *predictions])  # ordered, hashable labels of any type
    if not classes:
        return {"f1_macro": 0.0, "f1_micro": 0.0}
    tp, fp, fn = Counter(), Counter(), Counter()
    for p, g in zip(predictions, labels):
        if p == g:
            tp[g] += 1
        else:
            fp[p] += 1
            fn[g] += 1
    per_class = [2 * tp[c] / (2 * tp[c] + fp[c] + fn[c]) for c in classes]  # every class occurs, so > 0
    tps, fps, fns = sum(tp.values()), sum(fp.values()), sum(fn.values())
    return {"f1_macro": sum(per_class) / len(per_class), "f1_micro": 2 * tps / (2 * tps + fps + fns)}


def reasoning_tokens(text: str) -> int:
    """Length of the reasoning part in metric tokens (CJK characters count one each)."""
    return len(tokenize_for_metrics(split_output(text, opened=False)[0] or ""))


