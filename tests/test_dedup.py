"""Exact and near-duplicate detection (r1tune.data.dedup)."""

from __future__ import annotations

import random
import time

import pytest

from r1tune.data.dedup import BUCKET_WINDOW, DuplicateReport, find_duplicates, lsh_params, normalise

SENTENCE = ("the committee reviewed the quarterly report on regional water quality and agreed that "
            "the new filtration plant should open before the summer season begins next year in the green valley")


def _words(rng: random.Random, n: int) -> list[str]:
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(n)]


def test_normalise():
    assert normalise("  Ｈｅｌｌｏ\t\n  WORLD\u3000！ ") == "hello world !"


def test_exact_groups_after_normalisation():
    texts = ["Hello  World", "other text here", "hello world", "HELLO\tWORLD\n", "other text here", "unique"]
    report = find_duplicates(texts)
    assert report.exact_groups == [[0, 2, 3], [1, 4]]
    assert report.exact_duplicates == 3
    assert report.near_pairs == [] and report.near_duplicates == 0


def test_near_duplicate_found_and_different_text_not():
    assert len(SENTENCE.split()) == 30
    changed = SENTENCE.replace("filtration", "desalination")
    different = ("a small bakery on the corner sells fresh bread every morning and the owner knows "
                 "most of the customers by name since she opened the shop twenty years ago today")
    report = find_duplicates([SENTENCE, different, changed])
    assert report.exact_groups == []
    assert [(i, j) for i, j, _ in report.near_pairs] == [(0, 2)]
    assert 0.8 <= report.near_pairs[0][2] <= 1.0
    assert report.near_duplicates == 1


def test_near_pairs_skip_exact_duplicates():
    changed = SENTENCE.replace("committee", "council")
    report = find_duplicates([SENTENCE, SENTENCE.upper(), changed])
    assert report.exact_groups == [[0, 1]]
    assert [(i, j) for i, j, _ in report.near_pairs] == [(0, 2)]   # not (1, 2): 1 is an exact copy
    assert report.exact_duplicates == 1 and report.near_duplicates == 1


def test_chinese_near_duplicates():
    a = ("急性心肌梗死是冠状动脉急性、持续性缺血缺氧所引起的心肌坏死。临床上多有剧烈而持久的胸骨后疼痛，"
         "休息及硝酸酯类药物不能完全缓解，伴有血清心肌酶活性增高及进行性心电图变化，可并发心律失常、休克或心力衰竭，常可危及生命。")
    b = a.replace("剧烈而持久", "剧烈且持久")
    c = "今天天气很好，我们一起去公园散步，看到很多人在湖边钓鱼，孩子们在草地上放风筝，大家都很开心。"
    report = find_duplicates([a, c, b])
    assert [(i, j) for i, j, _ in report.near_pairs] == [(0, 2)]
    assert report.near_duplicates == 1


def test_empty_and_short_texts():
    texts = ["", "   ", "ab", "AB", "abc", "x", "", "abcd"]
    report = find_duplicates(texts, shingle=5)
    # "" and "   " normalise to the same empty text; short texts are one shingle each
    assert report.exact_groups == [[0, 1, 6], [2, 3]]
    assert report.near_pairs == []          # "ab", "abc", "abcd" are different single shingles
    assert find_duplicates([]) == DuplicateReport()
    assert find_duplicates([""]).exact_groups == []


def test_threshold_and_determinism():
    rng = random.Random(3)
    words = _words(rng, 300)
    base = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(50)]
    edited = []
    for text in base[:20]:
        w = text.split()
        w[rng.randrange(len(w))] = rng.choice(words)
        edited.append(" ".join(w))
    texts = base + edited
    first = find_duplicates(texts, seed=1)
    assert first == find_duplicates(texts, seed=1)
    assert all(i < j and est >= 0.8 for i, j, est in first.near_pairs)
    found = {j for _, j, _ in first.near_pairs}
    assert len(found & set(range(50, 70))) >= 18          # recall near 1 for one-word edits
    assert found <= set(range(50, 70))                     # the random base texts are not similar
    loose = find_duplicates(texts, threshold=0.5, seed=1)
    assert set(first.near_pairs) <= set(loose.near_pairs)


def test_lsh_params_fit_num_perm():
    for threshold in (0.5, 0.7, 0.8, 0.9, 0.95):
        for num_perm in (16, 64, 128):
            bands, rows = lsh_params(threshold, num_perm)
            assert bands * rows <= num_perm
    assert lsh_params(0.8, 64) == (9, 7)


def test_pathological_bucket_is_capped():
    # "aaaaa", "aaaaaa", ...: different texts with one identical shingle set, so all 300 share
    # every bucket; each is compared with its BUCKET_WINDOW predecessors, not all 44,850 pairs
    m = 300
    report = find_duplicates(["a" * n for n in range(5, 5 + m)])
    assert report.exact_groups == []
    w = BUCKET_WINDOW
    assert len(report.near_pairs) == w * m - w * (w + 1) // 2
    assert all(0 < j - i <= w and est == 1.0 for i, j, est in report.near_pairs)
    assert report.near_duplicates == m - 1                # every later record is still found


def test_bad_arguments():
    with pytest.raises(ValueError):
        find_duplicates(["a"], threshold=0)
    with pytest.raises(ValueError):
        find_duplicates(["a"], shingle=0)


def test_twenty_thousand_texts_are_fast():
    rng = random.Random(0)
    words = _words(rng, 5000)
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 40))) for _ in range(20_000)]
    texts[19_999] = texts[5]
    start = time.perf_counter()
    report = find_duplicates(texts)
    assert time.perf_counter() - start < 20
    assert report.exact_groups == [[5, 19_999]]


def test_find_repeats_across_sets_streamed_in_chunks():
    from r1tune.data.dedup import find_repeats

    changed = SENTENCE.replace("summer", "winter")
    assert changed != SENTENCE
    queries = [SENTENCE.upper(), "something else entirely, nothing like the corpus", changed, ""]
    corpus = [["unrelated text one", "unrelated text two"], [], ["  " + SENTENCE + " ", "x"], [changed + "!"]]
    found = find_repeats(queries, iter(corpus))
    assert found[0] == (2, 1.0, True)  # exact after normalisation (case, spaces); index counts across chunks
    assert found[2].corpus_index in (2, 4) and found[2].similarity >= 0.8 and not found[2].exact
    assert find_repeats([changed + "!"], iter(corpus))[0] == (4, 1.0, True)  # an exact repeat wins
    assert 1 not in found and 3 not in found
    assert find_repeats([], iter(corpus)) == {}
    assert find_repeats(queries, iter([])) == {}


def test_find_repeats_agrees_with_find_duplicates():
    import random

    rng = random.Random(3)
    words = [f"w{i}" for i in range(40)]
    texts = [" ".join(rng.choices(words, k=12)) for _ in range(300)]
    texts += [t.replace("w1 ", "w2 ", 1) for t in texts[:60]]  # near copies
    from r1tune.data.dedup import find_repeats

    queries, corpus = texts[:150], texts[150:]
    report = find_duplicates(queries + corpus)
    exact = {i for g in report.exact_groups for i in g if i < 150 and any(j >= 150 for j in g)}
    near = {i for i, j, _ in report.near_pairs if i < 150 <= j}
    found = find_repeats(queries, [corpus[k:k + 64] for k in range(0, len(corpus), 64)])
    assert exact | near <= set(found)  # every cross pair the all-pairs search lists is found
    assert all(r.similarity >= 0.8 for r in found.values())
    assert {i for i, r in found.items() if r.exact} == exact
