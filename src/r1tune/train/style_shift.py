"""Does the policy now write like the chosen answers? For held-out preference pairs: generate an
answer to each prompt and count how often it is closer (ROUGE-L F1 of the final answers) to the
chosen answer than to the rejected one. Measured before and after dpo training."""

from __future__ import annotations

from r1tune.data.encode import generation_prompt
from r1tune.data.metrics import rouge_l_f1
from r1tune.data.reasoning import split_reasoning
from r1tune.models.generate import answer_of, generate_texts


def style_shift(model, tokenizer, samples: list, max_new_tokens: int, empty_think: str, batch_size: int) -> dict:
    """{'generated/closer_to_chosen': share, 'generated/rouge_l_chosen': mean F1 against the chosen answers}
    over preference samples; an example generation is returned as 'sample'."""
    # the prompt as training rendered it before the chosen answer (an empty think block included)
    prompts = [generation_prompt(tokenizer, s.messages + [{"role": "assistant", "content": s.chosen}], empty_think)
               for s in samples]
    texts = generate_texts(model, tokenizer, prompts, max_new_tokens, batch_size)
    closer, to_chosen = 0, 0.0
    for sample, prompt, text in zip(samples, prompts, texts):
        answer = answer_of(text, prompt)
        chosen = rouge_l_f1(answer, split_reasoning(sample.chosen)[1])
        closer += chosen > rouge_l_f1(answer, split_reasoning(sample.rejected)[1])
        to_chosen += chosen
    n = max(len(samples), 1)
    return {"generated/closer_to_chosen": closer / n, "generated/rouge_l_chosen": to_chosen / n,
            "sample": (samples[0].messages[-1]["content"], answer_of(texts[0], prompts[0])) if samples else None}
