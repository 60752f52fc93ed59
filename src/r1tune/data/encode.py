"""Render a Conversation with the tokenizer's chat template and build the label mask.

Earlier assistant turns are rendered by the template itself (so their reasoning is
dropped exactly as the template drops it). The final turn cannot come from the
template, because the R1 template deletes its reasoning too: its prompt is the
template's generation prompt and its target is appended here, keeping `<think>`.
The whole text is tokenized once; each token is trained when it starts inside an
assistant span, so labels line up with the real tokenization at every boundary.
"""

from __future__ import annotations

import weakref
from bisect import bisect_left
from contextlib import contextmanager
from dataclasses import dataclass

from jinja2 import TemplateError

from r1tune.data.fast_render import SkeletonRenderer, registry_twin
from r1tune.data.formats import Conversation
from r1tune.data.reasoning import split_reasoning
from r1tune.data.templates import THINK_CLOSE, THINK_OPEN

IGNORE = -100
OPENED = THINK_OPEN + "\n"
EMPTY_THINK_TAIL = "\n" + THINK_CLOSE + "\n\n"
_SENTINEL = "\u2063r1tune-answer\u2063"


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    label: str | None = None  # class label (cls) or KTO tag, for balanced sampling
    segments: tuple[int, ...] | None = None  # lengths of the samples packed into this row

    @property
    def num_targets(self) -> int:
        return len(self.labels) - self.labels.count(IGNORE)


@dataclass
class PromptExample:
    """A GRPO prompt, rendered as generation sees it (the assistant's turn opened), and tokenized."""
    input_ids: list[int]
    text: str  # the rendered prompt (what the model continues)
    prompt: object  # what reward functions get as `prompts`: the messages (conversational) or the text
    columns: dict  # the record's other fields, passed to reward functions by name
    index: int = -1  # its place in the training set (seeds its sampling)
    label: str | None = None
    truncated: bool = False
    num_targets: int = 0  # nothing of it is trained: its completions are


@dataclass
class PairExample:
    """A preference pair: the prompt with the chosen answer and with the rejected one, each
    training only its final answer (reasoning kept, as SFT's final turn)."""
    chosen: Example
    rejected: Example
    label: str | None = None
    ref_logps: tuple[float, float] | None = None  # the reference model's, when computed before training

    @property
    def rows(self) -> tuple[Example, Example]:
        return self.chosen, self.rejected

    @property
    def num_targets(self) -> int:
        return self.chosen.num_targets + self.rejected.num_targets

    @property
    def truncated(self) -> bool:
        return self.chosen.truncated or self.rejected.truncated


@dataclass
class KTOExample:
    """A KTO example (its answer labelled desirable or not) and a mismatched row: its prompt with
    another example's answer, whose log-ratio estimates KTO's reference point."""
    answer: Example
    mismatched: Example
    label: str | None = None  # "true": desirable
    ref_logps: tuple[float, float] | None = None

    @property
    def rows(self) -> tuple[Example, Example]:
        return self.answer, self.mismatched


def prompt_length(example: Example) -> int:
    """Tokens before the first trained one."""
    return next((i for i, label in enumerate(example.labels) if label != IGNORE), len(example.labels))


def with_mismatched(examples: list[Example], cutoff_len: int) -> list[KTOExample]:
    """Each example paired with its prompt + the previous example's answer (the first with the last's),
    as TRL and LLaMA-Factory build KTO's KL rows; cut to cutoff_len."""
    out = []
    for i, example in enumerate(examples):
        other = examples[i - 1]  # the first takes the last one's
        cut, start = prompt_length(example), prompt_length(other)
        ids = example.input_ids[:cut] + other.input_ids[start:]
        labels = [IGNORE] * cut + other.input_ids[start:]
        out.append(KTOExample(example, truncate(Example(ids, labels), cutoff_len), example.label))
    return out


def final_answer_only(segments: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """Segments with only the last trained span (the final answer) still trained: preference and
    KTO judge one answer to the prompt, not the earlier turns of its history."""
    last = max((i for i, (_, trained) in enumerate(segments) if trained), default=-1)
    return [(text, trained and i == last) for i, (text, trained) in enumerate(segments)]


class TemplateMismatch(ValueError):
    """The chat template does not render conversations as growing prefixes."""


def renderer(tokenizer, tools: list | None = None):
    """render(messages, add_generation_prompt) -> text, with the tokenizer's chat template.

    Registry templates (and tokenizer templates that render like one) use the skeleton
    renderer for the records it can take, which is the same text without Jinja per record.
    """
    extra = {"tools": tools} if tools else {}

    def jinja(msgs: Conversation, generation: bool) -> str:
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation, **extra)
        except (TemplateError, TypeError, ValueError, KeyError) as exc:  # the template's own failure on this record
            raise TemplateMismatch(f"the chat template fails on this record ({type(exc).__name__}: {exc})") from None

    fast = None if tools else _skeleton_for(tokenizer)
    if fast is None:
        return jinja

    def render(msgs: Conversation, generation: bool) -> str:
        return fast(msgs, generation) if fast.fits(msgs) else jinja(msgs, generation)
    render.skeleton = fast  # lets _assistant_frame reuse frames that depend on roles only
    return render


_SKELETONS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _skeleton_for(tokenizer) -> SkeletonRenderer | None:
    """One skeleton renderer per tokenizer and chat template (None when no registry twin)."""
    template = getattr(tokenizer, "chat_template", None)
    cached = _SKELETONS.get(tokenizer)
    if cached is None or cached[0] != template:
        cached = (template, SkeletonRenderer(tokenizer) if registry_twin(tokenizer) else None)
        _SKELETONS[tokenizer] = cached
    return cached[1]


def render_segments(tokenizer, messages: Conversation, empty_think: str = "mask",
                    tools: list | None = None) -> list[tuple[str, bool]]:
    """[(text, trained?)] whose concatenation is the rendered conversation."""
    render = renderer(tokenizer, tools)
    segments: list[tuple[str, bool]] = []
    done = ""
    last = len(messages) - 1
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == last and not message.get("tool_calls"):
            prompt, target = final_turn(render, messages, empty_think)
        else:
            prompt, target = earlier_turn(render, messages[: i + 1])
        if not prompt.startswith(done):
            raise TemplateMismatch("the chat template renders a conversation's earlier turns differently from its prefix")
        segments += [(prompt[len(done):], False), (target, True)]
        done = prompt + target
    _check_tool_turns(messages, done)
    return [(text, trained) for text, trained in segments if text]


def _check_tool_turns(messages: Conversation, text: str) -> None:
    """Templates without tool support silently drop tool turns; refuse instead of training on a gap."""
    for message in messages:
        missing = (message["role"] == "tool" and message["content"] not in text) or any(
            call["function"]["name"] not in text for call in message.get("tool_calls", []))
        if missing:
            raise TemplateMismatch("the chat template does not render tool calls / tool outputs (function_call, "
                                   "observation turns); use a template that supports tools, e.g. the model's own")


def earlier_turn(render, messages: Conversation) -> tuple[str, str]:
    """(prompt, target) of an assistant message in the history, exactly as the template renders it."""
    full = render(messages, False)
    head = render(messages[:-1], False) + _assistant_frame(render, messages[:-1])[0]
    if not full.startswith(head):
        raise TemplateMismatch("the chat template renders an assistant turn differently in context")
    return head, full[len(head):]


def final_turn(render, messages: Conversation, empty_think: str) -> tuple[str, str]:
    """(prompt, target) of the last assistant message, reasoning kept."""
    prompt = render(messages[:-1], True)
    suffix = _assistant_frame(render, messages[:-1])[1]
    reasoning, answer = split_reasoning(messages[-1]["content"])
    if prompt.endswith(THINK_CLOSE + "\n\n"):  # a no-think template closed the block: answer only
        return prompt, answer + suffix
    opened = prompt.endswith(OPENED)
    if reasoning is not None:
        body = f"{reasoning}{EMPTY_THINK_TAIL}{answer}"
        return prompt, (body if opened else OPENED + body) + suffix
    if not opened:
        return prompt, answer + suffix
    if empty_think == "mask":
        return prompt + EMPTY_THINK_TAIL, answer + suffix
    if empty_think == "train":
        return prompt, EMPTY_THINK_TAIL + answer + suffix
    return prompt[: -len(OPENED)], answer + suffix  # omit


def generation_prompt(tokenizer, messages: Conversation, empty_think: str = "mask", tools: list | None = None) -> str:
    """The prompt for the conversation's last assistant turn, as training rendered it."""
    render = renderer(tokenizer, tools)
    if messages and messages[-1]["role"] == "assistant":
        return final_turn(render, messages, empty_think)[0]
    return render(messages, True)


def _assistant_frame(render, history: Conversation) -> tuple[str, str]:
    """(header, suffix) the template writes around an assistant message's content."""
    skeleton = getattr(render, "skeleton", None)
    if skeleton is not None and skeleton.fits(history):  # role-only rendering: the frame depends on roles only
        key = tuple(m["role"] for m in history)
        if key not in skeleton.frames:
            skeleton.frames[key] = _measure_frame(render, history)
        return skeleton.frames[key]
    return _measure_frame(render, history)


def _measure_frame(render, history: Conversation) -> tuple[str, str]:
    base = render(history, False)
    text = render(history + [{"role": "assistant", "content": _SENTINEL}], False)
    if not text.startswith(base) or _SENTINEL not in text:
        raise TemplateMismatch("the chat template does not render the assistant's content after the history")
    header, suffix = text[len(base):].split(_SENTINEL, 1)
    return header, suffix


def encode_segments(tokenizer, segments: list[tuple[str, bool]]) -> Example:
    """Tokenize the joined text once; label tokens that start inside a trained span."""
    return encode_segments_batch(tokenizer, [segments])[0]


def encode_segments_batch(tokenizer, batch: list[list[tuple[str, bool]]]) -> list[Example]:
    """encode_segments for many records with one tokenizer call (Rust batch encoding when available)."""
    texts = ["".join(t for t, _ in segments) for segments in batch]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # slow tokenizers: one call each, offsets from Python
        out = []
        for text, segments in zip(texts, batch):
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            out.append(_label(enc["input_ids"], [s for s, _ in enc["offset_mapping"]], segments))
        return out
    with unpadded(backend):
        encodings = backend.encode_batch(texts, add_special_tokens=False)
    return [_label_encoding(enc, segments) for enc, segments in zip(encodings, batch)]


@contextmanager
def unpadded(backend):
    """The Rust tokenizer with padding and truncation off while it encodes training text.

    A tokenizer that once padded a batch (left, for generation) keeps that setting, and
    save_pretrained writes it into tokenizer.json: encode_batch would then pad every sample
    of a batch to the longest, shifting tokens against their labels."""
    padding, truncation = backend.padding, backend.truncation
    if padding:
        backend.no_padding()
    if truncation:
        backend.no_truncation()
    try:
        yield backend
    finally:
        if padding:
            backend.enable_padding(**padding)
        if truncation:
            backend.enable_truncation(**truncation)


def _label_encoding(enc, segments: list[tuple[str, bool]]) -> Example:
    """Labels from a tokenizers Encoding, asking it only for the tokens at span boundaries."""
    ids = enc.ids
    labels, pos = [IGNORE] * len(ids), 0
    text_len = sum(len(t) for t, _ in segments)
    for seg_text, trained in segments:
        end = pos + len(seg_text)
        if trained:
            first, stop = _first_token_at(enc, pos, ids, text_len), _first_token_at(enc, end, ids, text_len)
            if first is None or stop is None:  # a character no token covers: use every offset
                return _label(ids, [s for s, _ in enc.offsets], segments)
            labels[first:stop] = ids[first:stop]
        pos = end
    return Example(ids, labels)


def _first_token_at(enc, char: int, ids: list[int], text_len: int) -> int | None:
    """Index of the first token that starts at or after `char` (len(ids) at the end of the text)."""
    if char >= text_len or not ids:
        return len(ids)
    token = enc.char_to_token(char)
    if token is None:
        return None
    return token if enc.token_to_chars(token)[0] >= char else token + 1


def _label(ids: list[int], starts: list[int], segments: list[tuple[str, bool]]) -> Example:
    """Train the tokens whose first character lies inside a trained segment."""
    labels, pos = [IGNORE] * len(ids), 0
    for seg_text, trained in segments:
        end = pos + len(seg_text)
        if trained:
            first, stop = bisect_left(starts, pos), bisect_left(starts, end)
            labels[first:stop] = ids[first:stop]
        pos = end
    return Example(list(ids), labels)


def truncate(example: Example, cutoff_len: int) -> Example:
    if len(example.input_ids) <= cutoff_len:
        return example
    return Example(example.input_ids[:cutoff_len], example.labels[:cutoff_len], truncated=True, label=example.label)


def encode_conversation(tokenizer, messages: Conversation, cutoff_len: int | None, empty_think: str = "mask",
                        tools: list | None = None) -> Example:
    example = encode_segments(tokenizer, render_segments(tokenizer, messages, empty_think, tools))
    return truncate(example, cutoff_len) if cutoff_len else example


def encode_text(tokenizer, text: str) -> Example:
    """A pretraining document: BOS (if the tokenizer has one) + text + EOS, every token but BOS trained."""
    return encode_texts(tokenizer, [text])[0]


def _token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    with unpadded(backend):
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]


def encode_prompts(tokenizer, prompts: list[tuple[Conversation, list | None]], empty_think: str,
                   conversational: list[bool], columns: list[dict]) -> list[PromptExample]:
    """GRPO prompts (messages, tools) rendered for generation and tokenized in one call."""
    texts = [generation_prompt(tokenizer, messages, empty_think, tools) for messages, tools in prompts]
    return [PromptExample(ids, text, messages if conv else text, cols)
            for ids, text, (messages, _), conv, cols in zip(_token_ids(tokenizer, texts), texts, prompts,
                                                           conversational, columns)]


def encode_texts(tokenizer, texts: list[str]) -> list[Example]:
    """encode_text for many documents with one tokenizer call."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    out = []
    for ids in _token_ids(tokenizer, texts):
        ids = list(ids) + ([eos] if eos is not None else [])
        out.append(Example(ids, list(ids)) if bos is None else Example([bos] + ids, [IGNORE] + ids))
    return out
