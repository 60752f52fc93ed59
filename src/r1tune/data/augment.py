"""Seeded text augmentation of training conversations, re-drawn every epoch.

`Augmenter(options)(conversation, seed, epoch, index)` returns a new, augmented copy
of one conversation. The result depends only on (seed, epoch, index) and the
options, so a resumed or repeated run sees exactly the same data, and every epoch
sees a different variant of each record.

What is augmented: user messages always; assistant messages (the training targets)
only with `augment_targets=True`; system and tool messages never. Never changed,
in any message: the reasoning inside `<think>…</think>` (or before a lone
`</think>`), code blocks and `inline code`, special tokens such as `<｜User｜>` and
other <tags>, URLs, e-mail addresses, numbers and identifiers (snake_case,
dotted.names, words with digits).

Operations, in this order, on each eligible text:

1. back-translation hook (`back_translate`), see below;
2. synonym replacement (`synonym_prob` per word or phrase found in the table);
3. random insertion (`insert_prob` per word: a synonym of a random table word of
   the text is inserted after it, EDA style);
4. local shuffle (`shuffle_window`): English words move at most that many places
   within a clause (never across punctuation, line breaks or protected spans);
   Chinese clauses split on ，、； move within their sentence, so the characters of
   each clause stay in order;
5. instruction-template rotation (`template_rotation`, the last user message only),
   with a template in the language of the instruction.

English is tokenized into words, spaces and punctuation, so joining the tokens
gives the text back; a replaced capitalised sentence-initial word stays
capitalised, capitalised words inside a sentence (likely names) and ALL-CAPS words
are left alone, and "a"/"an" before a changed word is corrected. Chinese (a text is
treated as Chinese when CJK characters dominate it) has no spaces: table entries are
found by greedy longest match, left to right.

Synonym tables are TSV files, one group of interchangeable words or phrases per
line, separated by tabs; blank lines and lines starting with # are ignored. The
bundled tables are `r1tune/resources/synonyms_en.tsv` and `synonyms_zh.tsv`. A
user table (`synonyms_file`) is merged into them: its groups are added, and a word
it lists leaves its bundled group (the user's grouping wins). A line
`# r1tune: replace-bundled` in the user file drops the bundled tables instead.

Back-translation hook contract: `back_translate: "module.path:function"` names a
function `f(text: str, rng: random.Random) -> str`, imported once when the
Augmenter is built (from sys.path, else the working folder). It is called once per
prose chunk of each eligible text of each augmented sample (chunks are the text
between <think> blocks, code blocks and special tokens; surrounding whitespace is
kept aside) with a `random.Random` seeded from (seed, epoch, record, message), and
must return the rewritten chunk. It should be deterministic given `rng`, so that
runs stay reproducible. A returned chunk that is empty, or that lost a number, URL,
e-mail address, identifier or `code` span of its input, is discarded and the input
kept (counted in `Augmenter.stats["back_translate_rejected"]`). An exception in the
function stops the run with a UserError naming the hook and the record. Example:

    # my_mt.py  (config:  augment_back_translate: my_mt:round_trip)
    from my_models import translate  # your own MT model

    def round_trip(text, rng):
        pivot = rng.choice(["de", "fr", "ja"])
        return translate(translate(text, target=pivot), target="en")
"""

from __future__ import annotations

import hashlib
import importlib
import os
import random
import re
import sys
from importlib import resources
from pathlib import Path
from typing import Callable

from r1tune.config import AugmentOptions
from r1tune.data.formats import Conversation
from r1tune.errors import UserError, did_you_mean

# The config key of each option, used in error messages (the run file is flat).
CONFIG_KEYS = {
    "synonym_prob": "augment_synonym_prob",
    "insert_prob": "augment_insert_prob",
    "shuffle_window": "augment_shuffle_window",
    "template_rotation": "augment_template_rotation",
    "instruction_templates": "augment_instruction_templates",
    "synonyms_file": "augment_synonyms_file",
    "back_translate": "augment_back_translate",
    "augment_targets": "augment_targets",
    "ratio": "augment_ratio",
}

DEFAULT_TEMPLATES = [
    "Please answer the following: {instruction}",
    "Please help with the following request: {instruction}",
    "Here is a request for you: {instruction}",
    "Request: {instruction}",
    "Read the following carefully and respond.\n\n{instruction}",
    "{instruction}\n\nPlease respond to the request above.",
    "I need some help with this: {instruction}",
    "Could you help me with the following?\n{instruction}",
    "请回答下面的问题：{instruction}",
    "请根据以下内容作答：\n{instruction}",
    "请处理下面的请求：{instruction}",
    "请仔细阅读下面的内容并回答：\n\n{instruction}",
    "{instruction}\n\n请回答上面的问题。",
    "我需要你的帮助：{instruction}",
    "帮我看看这个问题：{instruction}",
    "任务：{instruction}",
]

REPLACE_BUNDLED = "# r1tune: replace-bundled"


# --- protected spans --------------------------------------------------------------
# Hard spans are never changed and never crossed by a shuffle; soft spans are never
# changed but may move with the Chinese clause that holds them. Both are replaced by
# one private-use placeholder character while the text is augmented.
_HARD_PATTERNS = [
    r"<think>[\s\S]*?(?:</think>|\Z)",
    r"```[\s\S]*?(?:```|\Z)",
    r"<｜[^｜\n]{0,80}｜>",
    r"<\|[^|\n]{0,80}\|>",
    r"</?[A-Za-z][\w:.-]{0,40}(?:\s[^<>\n]{0,200})?/?>",
    r"\[/?[A-Z][A-Z_]{1,20}\]",
]
_SOFT_PATTERNS = [
    r"`[^`\n]+`",
    r"(?:(?:https?|ftp)://|www\.)[^\s<>\"'`\u3000-\u9fff\uff00-\uffef]*[^\s<>\"'`\u3000-\u9fff\uff00-\uffef.,;:!?)\]]",
    r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+",
    r"[A-Za-z_]*\d(?:[A-Za-z0-9_.,:/%+-]*[A-Za-z0-9_%])?",
    r"[A-Za-z_][A-Za-z0-9_]*(?:(?:\.|::|/|\\)[A-Za-z_][A-Za-z0-9_]*)+",
    r"[A-Za-z0-9]*_[A-Za-z0-9_]*",
]
_PLACEHOLDER_CHARS = r"[\U000F0000-\U0010FFFF]"  # also protects such characters already in a text
_SPANS = re.compile(f"(?P<hard>{'|'.join(_HARD_PATTERNS)})|(?P<soft>{_PLACEHOLDER_CHARS}|{'|'.join(_SOFT_PATTERNS)})")
_HARD_ONLY = re.compile("|".join(_HARD_PATTERNS))
_SOFT_ONLY = re.compile("|".join(_SOFT_PATTERNS))
_PLACEHOLDER = re.compile(_PLACEHOLDER_CHARS)
_SOFT_BASE, _HARD_BASE, _PER_KIND = 0xF0000, 0x100000, 0xFFFE

_CJK_CHAR = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN = re.compile(r"[A-Za-z]")
_EN_TOKEN = re.compile(r"(?P<w>[^\W\d_]+(?:['’-][^\W\d_]+)*)|(?P<s>\s+)|(?P<o>.)", re.S)
_SENTENCE_END = set(".!?…:;。！？；：")
_TRANSPARENT = set("\"'“”‘’([{*-#>")
_ZH_SENTENCE = re.compile(r"([。！？!?\n\U00100000-\U0010FFFF])")
_ZH_CLAUSE = re.compile(r"([，、；])")


def _orphan_think_end(text: str) -> int:
    """End of the reasoning when a text holds '</think>' with no '<think>' before it, else 0."""
    close = text.find("</think>")
    if close < 0:
        return 0
    opening = text.find("<think>")
    return close + len("</think>") if opening < 0 or opening > close else 0


def _mask(text: str) -> tuple[str, dict[str, str]] | None:
    """The text with each protected span replaced by one placeholder character (None: too many spans)."""
    originals: dict[str, str] = {}
    parts: list[str] = []
    counts = {"hard": 0, "soft": 0}

    def hold(span: str, kind: str) -> bool:
        if counts[kind] >= _PER_KIND:
            return False
        char = chr((_HARD_BASE if kind == "hard" else _SOFT_BASE) + counts[kind])
        counts[kind] += 1
        originals[char] = span
        parts.append(char)
        return True

    start = _orphan_think_end(text)
    if start and not hold(text[:start], "hard"):
        return None
    for m in _SPANS.finditer(text, start):
        parts.append(text[start:m.start()])
        if not hold(m.group(), m.lastgroup):
            return None
        start = m.end()
    parts.append(text[start:])
    return "".join(parts), originals


def _unmask(text: str, originals: dict[str, str]) -> str:
    return _PLACEHOLDER.sub(lambda m: originals[m.group()], text)


def _is_hard(char: str) -> bool:
    return ord(char) >= _HARD_BASE


def is_chinese(text: str) -> bool:
    """CJK-dominated text (protected spans excluded): handled without word spaces."""
    masked = _mask(text)
    return _mostly_cjk(masked[0] if masked else text)


def _mostly_cjk(body: str) -> bool:
    cjk = len(_CJK_CHAR.findall(body))
    return cjk > 0 and cjk * 3 >= len(_LATIN.findall(body))


def _rng(*parts) -> random.Random:
    """A random.Random seeded by a stable hash of the parts (not Python's salted hash())."""
    digest = hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "big"))


def _local_order(n: int, window: int, rng: random.Random) -> list[int]:
    """A permutation of range(n) in which no item moves more than `window` places."""
    return sorted(range(n), key=lambda i: i + rng.random() * (window + 1))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0].rstrip(".") if text else ""
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


# --- synonym table ----------------------------------------------------------------
def _norm(word: str) -> str:
    return " ".join(word.lower().split())


class SynonymTable:
    """Groups of interchangeable words; a word belongs to at most one group (the last one given)."""

    def __init__(self) -> None:
        self.groups: list[list[str]] = []
        self._group_of: dict[str, int] = {}
        self.max_words = 1  # longest non-CJK entry, in words
        self.max_chars = 1  # longest CJK entry, in characters

    def add_group(self, words: list[str]) -> None:
        gid = len(self.groups)
        group: list[str] = []
        for word in words:
            key = _norm(word)
            if not key or any(_norm(w) == key for w in group):
                continue
            old = self._group_of.get(key)
            if old is not None:
                self.groups[old] = [w for w in self.groups[old] if _norm(w) != key]
            self._group_of[key] = gid
            group.append(" ".join(word.split()))
            if _CJK_CHAR.match(key):
                self.max_chars = max(self.max_chars, len(key))
            else:
                self.max_words = max(self.max_words, len(key.split()))
        self.groups.append(group)

    def alternatives(self, word: str) -> list[str]:
        """The other members of the word's group ([] if it has none)."""
        key = _norm(word)
        gid = self._group_of.get(key)
        return [] if gid is None else [w for w in self.groups[gid] if _norm(w) != key]

    def group(self, word: str) -> list[str]:
        gid = self._group_of.get(_norm(word))
        return [] if gid is None else list(self.groups[gid])

    def __len__(self) -> int:
        return sum(1 for g in self.groups if len(g) >= 2)

    def load_tsv(self, text: str, bad_line: Callable[[int, str], None] | None = None) -> None:
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            words = [w.strip() for w in line.split("\t") if w.strip()]
            if len(words) < 2:
                if bad_line is None:
                    raise ValueError(f"bundled synonym table line {number} is malformed: {raw!r}")
                bad_line(number, line)
                continue
            self.add_group(words)


def bundled_table() -> SynonymTable:
    table = SynonymTable()
    folder = resources.files("r1tune.resources")
    for name in ("synonyms_en.tsv", "synonyms_zh.tsv"):
        table.load_tsv(folder.joinpath(name).read_text(encoding="utf-8"))
    return table


# --- English tokens ---------------------------------------------------------------
class _Tok:
    __slots__ = ("text", "kind", "start", "changed")

    def __init__(self, text: str, kind: str, start: bool = False, changed: bool = False):
        self.text, self.kind, self.start, self.changed = text, kind, start, changed


def _en_tokens(text: str) -> list[_Tok]:
    tokens, sentence_start = [], True
    for m in _EN_TOKEN.finditer(text):
        tok = _Tok(m.group(), m.lastgroup)
        if tok.kind == "w":
            tok.start, sentence_start = sentence_start, False
        elif tok.kind == "s":
            sentence_start = sentence_start or "\n" in tok.text
        elif tok.text in _SENTENCE_END or _is_hard(tok.text):
            sentence_start = True
        elif tok.text not in _TRANSPARENT:
            sentence_start = False
        tokens.append(tok)
    return tokens


def _joins(tok: _Tok) -> bool:
    """Whitespace that joins two words of one phrase or shuffle run."""
    return tok.kind == "s" and "\n" not in tok.text


def _article(word: str) -> str:
    w = word.lower()
    if w.startswith(("hour", "honest", "honor", "honour", "heir")):
        return "an"
    if w.startswith(("uni", "use", "usu", "uti", "eu", "one", "once", "ur")):
        return "a"
    return "an" if w[:1] in "aeiou" else "a"


# --- the augmenter ----------------------------------------------------------------
class Augmenter:
    def __init__(self, options: AugmentOptions, source: str = "config"):
        self.options, self.source = options, source
        self.stats = {"back_translate_rejected": 0}
        self._check_numbers()
        self.table = self._load_tables()
        self._templates = self._load_templates()
        self._hook = self._import_hook(options.back_translate) if options.back_translate else None

    # construction -----------------------------------------------------------------
    def _key(self, name: str) -> str:
        return CONFIG_KEYS[name]

    def _check_numbers(self) -> None:
        o = self.options
        for name in ("synonym_prob", "insert_prob", "template_rotation", "ratio"):
            value = getattr(o, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise UserError(f"{self.source}: {self._key(name)} is {value!r}; use a number from 0 to 1")
        if isinstance(o.shuffle_window, bool) or not isinstance(o.shuffle_window, int) or o.shuffle_window < 0:
            raise UserError(f"{self.source}: {self._key('shuffle_window')} is {o.shuffle_window!r}; "
                            "use a whole number of positions (0 turns shuffling off)")

    def _load_tables(self) -> SynonymTable:
        path = self.options.synonyms_file
        if not path:
            return bundled_table()
        key, where = self._key("synonyms_file"), f"{self.source}: {self._key('synonyms_file')}"
        file = Path(path).expanduser()
        if not file.exists():
            raise UserError(f"{where} '{path}' does not exist; set {key} to a TSV file with one group of "
                            "tab-separated synonyms per line")
        if not file.is_file():
            raise UserError(f"{where} '{path}' is not a file; set {key} to a TSV file with one group of "
                            "tab-separated synonyms per line")
        try:
            text = file.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError:
            raise UserError(f"{where} '{path}' is not UTF-8 text; save the table as UTF-8") from None
        except OSError as exc:
            raise UserError(f"{where} '{path}' cannot be read ({exc.strerror or exc}); "
                            f"check the file's permissions or point {key} to another file") from None

        def bad_line(number: int, line: str) -> None:
            if "\t" not in line and len(line.split()) >= 2:
                why = "has no tab (synonyms there are separated by spaces)"
            else:
                why = "holds only one word"
            raise UserError(f"{where} '{path}' line {number} {why}; put two or more synonyms on each line, "
                            "separated by tabs")

        table = SynonymTable() if any(l.strip() == REPLACE_BUNDLED for l in text.splitlines()) else bundled_table()
        table.load_tsv(text, bad_line)
        return table

    def _load_templates(self) -> dict[str, list[str]]:
        templates = self.options.instruction_templates
        key = self._key("instruction_templates")
        if templates is None:
            templates = DEFAULT_TEMPLATES
        elif not isinstance(templates, (list, tuple)) or not templates:
            raise UserError(f"{self.source}: {key} must be a non-empty list of templates containing "
                            "'{instruction}'; list some or leave the key out for the bundled ones")
        by_lang: dict[str, list[str]] = {"en": [], "zh": []}
        for number, template in enumerate(templates):
            if not isinstance(template, str) or "{instruction}" not in template:
                raise UserError(f"{self.source}: {key} item {number} ({template!r}) has no '{{instruction}}' "
                                "placeholder; add it where the original instruction goes")
            by_lang["zh" if is_chinese(template.replace("{instruction}", "")) else "en"].append(template)
        return by_lang

    def _import_hook(self, spec: str) -> Callable:
        key = self._key("back_translate")
        where = f"{self.source}: {key}"
        module_name, _, attr = spec.partition(":") if isinstance(spec, str) else ("", "", "")
        module_name, attr = module_name.strip(), attr.strip()
        if not module_name or not attr or ":" in attr:
            raise UserError(f"{where} is {spec!r}; write it as 'module.path:function', naming a module to "
                            "import and a function f(text, rng) -> str in it")
        try:
            module = self._import_module(module_name)
        except Exception as exc:  # noqa: BLE001 - any failure in the user's module
            raise UserError(f"{where} cannot import module '{module_name}' ({_first_line(exc)}); put the module "
                            "on PYTHONPATH or in the working folder and make sure it imports cleanly") from exc
        obj = module
        for part in attr.split("."):
            if not hasattr(obj, part):
                names = [n for n in dir(obj) if not n.startswith("_")]
                raise UserError(f"{where}: module '{module_name}' has no '{attr}'; name a function defined in "
                                f"it{did_you_mean(part, names)}")
            obj = getattr(obj, part)
        if not callable(obj):
            raise UserError(f"{where} '{spec}' is a {type(obj).__name__}, not a function; name a function "
                            "f(text, rng) -> str")
        return obj

    @staticmethod
    def _import_module(name: str):
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as exc:
            cwd = os.getcwd()
            top = name.split(".")[0]
            if exc.name != top or cwd in sys.path:
                raise
            sys.path.insert(0, cwd)  # a console script does not have the working folder on sys.path
            try:
                return importlib.import_module(name)
            except ModuleNotFoundError:
                sys.path.remove(cwd)
                raise

    # per sample -------------------------------------------------------------------
    def __call__(self, conversation: Conversation, seed: int, epoch: int, index: int) -> Conversation:
        out = [dict(message) for message in conversation]
        o = self.options
        if not o.enabled():
            return out
        sample = _rng(seed, epoch, index, "sample")
        augment, rotate, pick = sample.random() < o.ratio, sample.random() < o.template_rotation, sample.random()
        if not augment:
            return out
        roles = ("user", "assistant") if o.augment_targets else ("user",)
        for position, message in enumerate(out):
            content = message.get("content")
            if message.get("role") in roles and isinstance(content, str) and content.strip():
                message["content"] = self._augment_text(content, seed, epoch, index, position)
        if rotate:
            last_user = next((m for m in reversed(out) if m.get("role") == "user" and isinstance(m.get("content"), str)
                              and m["content"].strip()), None)
            if last_user is not None:
                lang = "zh" if is_chinese(last_user["content"]) else "en"
                choices = self._templates[lang] or self._templates["zh" if lang == "en" else "en"]
                template = choices[min(int(pick * len(choices)), len(choices) - 1)]
                last_user["content"] = template.replace("{instruction}", last_user["content"])
        return out

    def _augment_text(self, text: str, seed: int, epoch: int, index: int, position: int) -> str:
        if self._hook is not None:
            text = self._back_translate(text, _rng(seed, epoch, index, position, "back_translate"), index)
        o = self.options
        if not (o.synonym_prob > 0 or o.insert_prob > 0 or o.shuffle_window > 0):
            return text
        masked = _mask(text)
        if masked is None:
            return text
        body, originals = masked
        rng = _rng(seed, epoch, index, position)
        body = self._augment_zh(body, rng) if _mostly_cjk(body) else self._augment_en(body, rng)
        return _unmask(body, originals)

    def _back_translate(self, text: str, rng: random.Random, index: int) -> str:
        """Run the hook on each prose chunk (text outside hard-protected spans)."""
        pieces, start = [], _orphan_think_end(text)
        if start:
            pieces.append(text[:start])
        for m in list(_HARD_ONLY.finditer(text, start)) + [None]:
            end = m.start() if m else len(text)
            pieces.append(self._back_translate_chunk(text[start:end], rng, index))
            if m:
                pieces.append(m.group())
                start = m.end()
        return "".join(pieces)

    def _back_translate_chunk(self, chunk: str, rng: random.Random, index: int) -> str:
        core = chunk.strip()
        if not core or not any(c.isalpha() for c in core):
            return chunk
        lead, trail = chunk[:len(chunk) - len(chunk.lstrip())], chunk[len(chunk.rstrip()):]
        spec, key = self.options.back_translate, self._key("back_translate")
        try:
            result = self._hook(core, rng)
        except Exception as exc:  # noqa: BLE001 - the user's function
            raise UserError(f"{self.source}: {key} hook '{spec}' raised {_first_line(exc)} on record {index}; "
                            f"fix the function or remove {key}") from exc
        if not isinstance(result, str):
            raise UserError(f"{self.source}: {key} hook '{spec}' returned {type(result).__name__} instead of a string "
                            f"on record {index}; make it return the rewritten text")
        kept = [m.group() for m in _SOFT_ONLY.finditer(core)]
        if not result.strip() or any(span not in result for span in kept):
            self.stats["back_translate_rejected"] += 1
            return chunk
        return lead + result.strip() + trail

    # English ----------------------------------------------------------------------
    def _match_en(self, tokens: list[_Tok], i: int) -> tuple[int, str] | None:
        """The longest table phrase starting at word token i: (end token index, phrase)."""
        first = tokens[i].text
        if not (first.islower() or (tokens[i].start and first[0].isupper() and first[1:].islower())):
            return None  # names inside a sentence, ALL-CAPS and mixed-case words are left alone
        words, ends = [first], [i + 1]
        j = i + 1
        while len(words) < self.table.max_words and j + 1 < len(tokens) and _joins(tokens[j]) \
                and tokens[j + 1].kind == "w" and tokens[j + 1].text.islower():
            words.append(tokens[j + 1].text)
            ends.append(j + 2)
            j += 2
        for n in range(len(words), 0, -1):
            phrase = " ".join(words[:n])
            if self.table.alternatives(phrase):
                return ends[n - 1], phrase
        return None

    def _augment_en(self, text: str, rng: random.Random) -> str:
        o, table = self.options, self.table
        tokens = _en_tokens(text)
        found: list[str] = []
        out: list[_Tok] = []
        i = 0
        while i < len(tokens):
            match = self._match_en(tokens, i) if tokens[i].kind == "w" else None
            if match is None:
                out.append(tokens[i])
                i += 1
                continue
            end, phrase = match
            found.append(phrase)
            if o.synonym_prob > 0 and rng.random() < o.synonym_prob:
                new = rng.choice(table.alternatives(phrase))
                if tokens[i].text[0].isupper():
                    new = new[0].upper() + new[1:]
                out.append(_Tok(new, "w", tokens[i].start, changed=True))
            else:
                out.extend(tokens[i:end])
            i = end
        if o.insert_prob > 0 and found:
            tokens, out = out, []
            for tok in tokens:
                out.append(tok)
                if tok.kind == "w" and rng.random() < o.insert_prob:
                    new = rng.choice(table.alternatives(rng.choice(found)))
                    out += [_Tok(" ", "s"), _Tok(new, "w", changed=True)]
        if o.shuffle_window > 0:
            self._shuffle_en(out, rng)
        self._fix_articles(out)
        return "".join(t.text for t in out)

    def _shuffle_en(self, tokens: list[_Tok], rng: random.Random) -> None:
        """Shuffle each run of words joined by plain spaces (a clause), keeping the spaces in place."""
        run: list[int] = []

        def flush() -> None:
            if len(run) >= 2:
                words = [tokens[j] for j in run]
                for slot, source in zip(run, _local_order(len(run), self.options.shuffle_window, rng)):
                    moved = words[source]
                    moved.changed = moved.changed or moved is not tokens[slot]
                    tokens[slot] = moved
                first, now = words[0], tokens[run[0]]
                if now is not first and first.start and first.text != "I" and first.text[0].isupper() \
                        and first.text[1:].islower() and now.text.islower():
                    # the sentence keeps a capital: "Please explain it" -> "Explain please it"
                    now.text = now.text[0].upper() + now.text[1:]
                    first.text = first.text[0].lower() + first.text[1:]
            run.clear()

        for i, tok in enumerate(tokens):
            if tok.kind == "w":
                run.append(i)
            elif not _joins(tok):
                flush()
        flush()

    @staticmethod
    def _fix_articles(tokens: list[_Tok]) -> None:
        for i, tok in enumerate(tokens[:-2]):
            nxt = tokens[i + 2]
            if tok.kind == "w" and tok.text.lower() in ("a", "an") and _joins(tokens[i + 1]) and nxt.kind == "w" \
                    and (tok.changed or nxt.changed):
                article = _article(nxt.text)
                tok.text = article.capitalize() if tok.text[0].isupper() else article

    # Chinese ----------------------------------------------------------------------
    def _augment_zh(self, text: str, rng: random.Random) -> str:
        o, table = self.options, self.table
        pieces: list[tuple[str, bool]] = []  # (text, is a table word)
        found: list[str] = []
        plain, i = [], 0
        while i < len(text):
            word = ""
            if _CJK_CHAR.match(text[i]):
                for n in range(min(table.max_chars, len(text) - i), 0, -1):
                    candidate = text[i:i + n]
                    if candidate == _norm(candidate) and table.alternatives(candidate):
                        word = candidate
                        break
            if not word:
                plain.append(text[i])
                i += 1
                continue
            if plain:
                pieces.append(("".join(plain), False))
                plain = []
            found.append(word)
            if o.synonym_prob > 0 and rng.random() < o.synonym_prob:
                pieces.append((rng.choice(table.alternatives(word)), True))
            else:
                pieces.append((word, True))
            i += len(word)
        if plain:
            pieces.append(("".join(plain), False))
        if o.insert_prob > 0 and found:
            with_inserts = []
            for piece in pieces:
                with_inserts.append(piece)
                if piece[1] and rng.random() < o.insert_prob:
                    with_inserts.append((rng.choice(table.alternatives(rng.choice(found))), False))
            pieces = with_inserts
        text = "".join(p for p, _ in pieces)
        if o.shuffle_window > 0:
            text = self._shuffle_zh(text, rng)
        return text

    def _shuffle_zh(self, text: str, rng: random.Random) -> str:
        parts = _ZH_SENTENCE.split(text)
        for s in range(0, len(parts), 2):  # even items are sentences, odd ones their ends
            bits = _ZH_CLAUSE.split(parts[s])
            slots = [b for b in range(0, len(bits), 2) if bits[b].strip()]
            if len(slots) < 2:
                continue
            clauses = [bits[b] for b in slots]
            for slot, source in zip(slots, _local_order(len(slots), self.options.shuffle_window, rng)):
                bits[slot] = clauses[source]
            parts[s] = "".join(bits)
        return "".join(parts)
