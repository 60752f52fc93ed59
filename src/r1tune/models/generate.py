"""Greedy generation on held-out prompts and exact-match accuracy of the final answers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r1tune import ui
from r1tune.data.encode import generation_prompt
from r1tune.data.reasoning import prompt_opens_reasoning, split_output, split_reasoning
from r1tune.data.formats import Conversation
from r1tune.data.templates import THINK_OPEN


@dataclass
class GenerationScore:
    accuracy: float
    correct: int
    total: int
    samples: list[tuple[str, str, str, bool]]  # (prompt question, expected answer, generated text, correct)


def with_open_think(prompt: str, generated: str) -> str:
    """The generated text with the `<think>` the prompt opened, so the reasoning split sees it."""
    return THINK_OPEN + generated if prompt_opens_reasoning(prompt) else generated


def answer_of(generated: str, prompt: str) -> str:
    """The final answer in generated text, as chat and serve show it (data.reasoning.split_output);
    '' while a reasoning block is unclosed."""
    return split_output(generated, prompt_opens_reasoning(prompt))[1]


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 8,
                   sampling: dict | None = None, progress: str | None = None) -> list[str]:
    """Continuations of rendered prompts in left-padded batches with the KV cache: greedy, or sampled
    with `sampling` = {"temperature": ..., "top_p": ...} (seed torch first for repeatable samples).
    `progress`: a phase name; the batches then get a line and a progress bar (r1tune.ui.progress)."""
    options = {"do_sample": True, **sampling} if sampling else {"do_sample": False}
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    backend = getattr(tokenizer, "backend_tokenizer", None)
    padding = backend.padding if backend is not None else None  # padding=True below turns it on for good
    tokenizer.padding_side = "left"
    outputs = []
    model.eval()
    try:
        starts = range(0, len(prompts), batch_size)
        for i in ui.progress(starts, progress) if progress else starts:
            enc = tokenizer(prompts[i:i + batch_size], add_special_tokens=False, return_tensors="pt", padding=True).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, **options,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            new = out[:, enc["input_ids"].shape[1]:]
            outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        if backend is not None and padding is None:
            backend.no_padding()  # else save_pretrained would write left padding into tokenizer.json
    return outputs


def exact_match(model, tokenizer, conversations: list[Conversation], max_new_tokens: int,
                empty_think: str = "mask") -> GenerationScore:
    prompts = [generation_prompt(tokenizer, c, empty_think) for c in conversations]
    texts = generate_texts(model, tokenizer, prompts, max_new_tokens)
    correct, samples = 0, []
    for conv, prompt, text in zip(conversations, prompts, texts):
        expected = split_reasoning(conv[-1]["content"])[1]
        right = answer_of(text, prompt) == expected
        correct += right
        samples.append((conv[-2]["content"], expected, text, right))
    return GenerationScore(correct / max(len(texts), 1), correct, len(texts), samples)


def generation_metrics(model, tokenizer, conversations: list[Conversation], max_new_tokens: int,
                       empty_think: str = "mask", batch_size: int = 8) -> dict:
    """Exact match, BLEU-4 and ROUGE-L of the generated final answers (the model is left in eval mode)."""
    from r1tune.data import metrics

    prompts = [generation_prompt(tokenizer, c, empty_think) for c in conversations]
    texts = generate_texts(model, tokenizer, prompts, max_new_tokens, batch_size)
    answers = [answer_of(t, p) for t, p in zip(texts, prompts)]
    references = [split_reasoning(c[-1]["content"])[1] for c in conversations]
    return {"exact_match": metrics.exact_match(answers, references), "accuracy": metrics.accuracy(answers, references),
            "bleu4": metrics.bleu4(answers, references), "rouge_l": metrics.rouge_l(answers, references)}
