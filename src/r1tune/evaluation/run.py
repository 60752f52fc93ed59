"""`r1tune eval RUN.yaml`: score the tuned model (and the base) on held-out data; gate on thresholds.

Top to bottom: held-out conversations (eval_dataset, or the same val_size split training used)
→ for each model: perplexity (teacher-forced), batched greedy generation with the run's template,
answers after `</think>` scored by BLEU-4 / ROUGE-L / exact match / accuracy / F1, reasoning
length, optional robustness (perturbed prompts) and multiple-choice benchmark → predictions
JSONL, report (JSON, Markdown, PNG) → PASS/FAIL per threshold; exit code 1 on any FAIL.
A reward model (output_dir with value_head.safetensors, from `stage: rm`) is scored by its value head
instead of generating (evaluation/reward.py), through the same report and thresholds.
A metric that does not apply to the data is n/a with the reason (metrics.not_applicable), and a
threshold on it FAILs. Each phase prints a line and, in a terminal, a progress bar (ui.progress).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch

from r1tune.config import RunConfig
from r1tune.data.prepare import prepare_data
from r1tune.data.encode import PairExample, generation_prompt
from r1tune.data.reasoning import split_reasoning
from r1tune.data.templates import apply_template_choice
from r1tune.errors import UserError
from r1tune.data import metrics
from r1tune.models.generate import answer_of, generate_texts, with_open_think
from r1tune.evaluation.reward import evaluate_reward_model, is_reward_model
from r1tune.evaluation.report import (derived, format_gain, gate_actual, judge, metric_rows, parse_thresholds,
                                      write_report)
from r1tune.fileio import write_text_atomic
from r1tune.models.loading import load_model, resolve_model_path
from r1tune.models.run_loading import load_run
from r1tune.train.held_out import held_out_sum
from r1tune.train.held_out import perplexity as held_out_perplexity
from r1tune.ui import console, progress


def run_eval(cfg: RunConfig) -> int:
    """Evaluate; returns the exit code (0 pass, 1 a threshold failed)."""
    cfg.require("output_dir", "dataset", command="r1tune eval")
    gates = parse_thresholds(cfg.eval_thresholds, cfg.source)
    tuned_dir = Path(cfg.output_dir)
    if not (tuned_dir / "r1tune_config.yaml").is_file():
        raise UserError(f"output_dir '{tuned_dir}' holds no trained model (no r1tune_config.yaml); "
                        "run 'r1tune train' with this config first, or point output_dir at a finished run")
    out = Path(cfg.eval_output_dir or tuned_dir / "eval")
    if is_reward_model(cfg, tuned_dir):  # a value head scores the held-out answers (evaluation/reward.py)
        tuned, base = evaluate_reward_model(cfg, tuned_dir, out), None
    else:
        tuned, base = evaluate_generation(cfg, tuned_dir, out)
    gains = derived(tuned, base)
    judge(gates, tuned, gains, cfg.source)
    paths = write_report(out, tuned, base, gains, gates)
    print_summary(tuned, base, gains, gates)
    console.print(f"report: {', '.join(str(p) for p in paths.values())}")
    return 0 if all(g.passed for g in gates) else 1


def evaluate_generation(cfg: RunConfig, tuned_dir: Path, out: Path) -> tuple[dict, dict | None]:
    """The tuned model's (and unless eval_compare_base is false, the base's) scores on generated answers."""
    model, tokenizer = load_run(str(tuned_dir))
    apply_template_choice(tokenizer, cfg.template, cfg.source, needs_template=True)
    held_out = held_out_set(cfg, tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    tuned = score_model("tuned", model, tokenizer, held_out, cfg, out)
    base = None
    if cfg.eval_compare_base:
        del model
        base_model = load_model(resolve_model_path(cfg.model_name_or_path), torch.float32, cfg.trust_remote_code)
        base = score_model("base", base_model, tokenizer, held_out, cfg, out)
    return tuned, base


class HeldOut:
    """The conversations, their encoded examples (for perplexity) and rendered prompts."""

    def __init__(self, conversations, examples, tokenizer, empty_think: str):
        self.conversations, self.examples = conversations, examples
        self.prompts = [generation_prompt(tokenizer, c, empty_think) for c in conversations]
        self.references = [split_reasoning(c[-1]["content"])[1] for c in conversations]


def held_out_set(cfg: RunConfig, tokenizer) -> HeldOut:
    if not cfg.eval_dataset and not cfg.val_size:
        raise UserError(f"{cfg.source}: r1tune eval needs held-out data; set eval_dataset (a file) or val_size "
                        "(the same split training used)")
    data = prepare_data(cfg, tokenizer, say=lambda *a, **k: None)
    pairs = [_scored_conversation(s, e) for s, e in zip(data.val_samples, data.val) if s.kind != "text"]
    pairs = pairs[: cfg.eval_max_samples]
    if not pairs:
        raise UserError(f"{cfg.source}: the held-out data has no conversation to generate answers for")
    return HeldOut([c for c, _ in pairs], [e for _, e in pairs], tokenizer, cfg.empty_think)


def _scored_conversation(sample, example) -> tuple[list, object]:
    """(conversation, example): a preference pair (a dpo run's held-out data) is scored against its chosen
    answer, its perplexity that of the chosen row."""
    if isinstance(example, PairExample):
        return sample.messages + [{"role": "assistant", "content": sample.chosen}], example.chosen
    return sample.messages, example


def score_model(name: str, model, tokenizer, held: HeldOut, cfg: RunConfig, out: Path) -> dict:
    console.print(f"scoring the {name} model on {len(held.prompts)} held-out prompts")
    model.eval()
    scores = {"perplexity": perplexity(model, held.examples, tokenizer.pad_token_id, cfg.per_device_eval_batch_size,
                                       desc=f"{name} perplexity")}
    texts = generate(model, tokenizer, held.prompts, cfg, desc=f"{name} generation")
    answers = [answer_of(t, p) for p, t in zip(held.prompts, texts)]
    scores.update(text_scores(answers, held.references))
    scores["reasoning_tokens"] = sum(metrics.reasoning_tokens(with_open_think(p, t))
                                     for p, t in zip(held.prompts, texts)) / len(texts)
    write_predictions(out / f"predictions_{name}.jsonl", held, texts, answers)
    if cfg.eval_robustness:
        scores.update(robustness(model, tokenizer, held, cfg, scores["accuracy"], name))
    if cfg.eval_mc_file:
        scores.update(multiple_choice(model, tokenizer, cfg, name))
    return scores


def text_scores(answers: list[str], references: list[str]) -> dict:
    """The answer metrics; those that do not apply to these references are NotApplicable."""
    scores = {"bleu4": metrics.bleu4(answers, references), "rouge_l": metrics.rouge_l(answers, references),
              "exact_match": metrics.exact_match(answers, references),
              "accuracy": metrics.accuracy(answers, references), **metrics.f1_scores(answers, references)}
    return {**scores, **metrics.not_applicable(references)}


def generate(model, tokenizer, prompts: list[str], cfg: RunConfig, desc: str | None = None) -> list[str]:
    """The run's generation settings: greedy, or sampled (seeded by `seed`) with do_sample."""
    sampling = {"temperature": cfg.temperature or 0.7, "top_p": cfg.top_p} if cfg.do_sample else None
    if sampling:
        torch.manual_seed(cfg.seed)
    return generate_texts(model, tokenizer, prompts, cfg.max_new_tokens, cfg.per_device_eval_batch_size, sampling,
                          progress=desc)


def perplexity(model, examples, pad_id: int, batch_size: int, desc: str | None = None):
    """exp(mean token loss) over the held-out answers, teacher-forced, as training measures it
    (train.held_out); n/a when no answer token is left."""
    batches = (lambda parts: progress(parts, desc)) if desc else None
    total, count = held_out_sum(model, examples, pad_id, batch_size, batches=batches)
    if not count:
        return metrics.NotApplicable("no answer tokens within cutoff_len")
    return held_out_perplexity(total / count)


def write_predictions(path: Path, held: HeldOut, texts: list[str], answers: list[str]) -> None:
    rows = []
    for conv, prompt, text, answer, ref in zip(held.conversations, held.prompts, texts, answers, held.references):
        rows.append({"question": conv[-2]["content"], "reference": ref, "output": text, "answer": answer,
                     "reasoning_tokens": metrics.reasoning_tokens(with_open_think(prompt, text)),
                     "exact_match": metrics.exact_match([answer], [ref]) == 1.0})
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def robustness(model, tokenizer, held: HeldOut, cfg: RunConfig, clean: float, name: str = "tuned") -> dict:
    """Accuracy on perturbed copies of the user questions, per kind and their mean."""
    from r1tune.evaluation.robustness import PERTURBATIONS, perturb_prompts

    kinds = PERTURBATIONS if cfg.eval_robustness.strip() == "all" else \
        tuple(k.strip() for k in cfg.eval_robustness.split(",") if k.strip())
    questions = [c[-2]["content"] for c in held.conversations]
    perturbed = perturb_prompts(questions, kinds, seed=cfg.seed, rate=cfg.eval_robustness_rate)
    scores = {}
    for kind, texts in progress(list(perturbed.items()), f"{name} robustness", unit="kind"):
        conversations = [_replace_question(c, q) for c, q in zip(held.conversations, texts)]
        prompts = [generation_prompt(tokenizer, c, cfg.empty_think) for c in conversations]
        outputs = generate(model, tokenizer, prompts, cfg, desc=f"{name} robustness {kind}")
        answers = [answer_of(t, p) for p, t in zip(prompts, outputs)]
        scores[f"robust_accuracy_{kind}"] = metrics.accuracy(answers, held.references)
    scores["robust_accuracy"] = sum(scores.values()) / max(len(scores), 1)
    scores["robust_drop"] = clean - scores["robust_accuracy"]
    return scores


def _replace_question(conversation, question: str):
    changed = copy.deepcopy(conversation)
    changed[-2]["content"] = question
    return changed


def multiple_choice(model, tokenizer, cfg: RunConfig, name: str = "tuned") -> dict:
    from r1tune.evaluation.multiple_choice import bundled_sample, read_mc_file, score_multiple_choice

    path = bundled_sample() if cfg.eval_mc_file == "bundled" else Path(cfg.eval_mc_file)
    questions = read_mc_file(path)
    shots = questions[: cfg.eval_mc_shots]
    result = score_multiple_choice(model, tokenizer, questions[cfg.eval_mc_shots:] if shots else questions, shots,
                                   cfg.per_device_eval_batch_size, progress=f"{name} multiple choice")
    if not result["total"]:
        return {"mc_accuracy": metrics.NotApplicable(f"no question left after the {len(shots)} shots")}
    return {"mc_accuracy": result["accuracy"]}


def print_summary(tuned: dict, base: dict | None, gains: dict, gates) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="evaluation")
    for column in ("metric", "base", "tuned"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for row in metric_rows(tuned, base):
        table.add_row(*row)
    for key, value in gains.items():
        table.add_row(key, "", format_gain(value))
    console.print(table)
    for gate in gates:
        mark = "[green]PASS[/green]" if gate.passed else "[red]FAIL[/red]"
        console.print(f"{mark} {escape(gate.text)} ({escape(gate_actual(gate))})")
    ppl = tuned.get("perplexity", 0.0)
    if isinstance(ppl, float) and not math.isfinite(ppl):
        console.print("note: tuned perplexity is not finite")
