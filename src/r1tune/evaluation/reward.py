"""`r1tune eval` of a reward model: an output_dir with value_head.safetensors (a `stage: rm` run) is scored
by its value head instead of generating.

The held-out records (eval_dataset, or the val_size split training held out) are encoded as training
encodes them, cut to cutoff_len, and scored as training scores them (RewardModelLoss.scores: the value
head on each row's last real token). Preference pairs give TRL's rewards/chosen, rewards/rejected,
rewards/margins and rewards/accuracies (chosen scored strictly above rejected), the same sums training
logs (pref_losses.reward_metrics); conversations (a prompt and its answer) give rewards/mean, and every
record's score goes to predictions_tuned.jsonl. The base model has no value head, so nothing is compared.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from r1tune.config import RunConfig
from r1tune.data.dataset import encode_many, load_samples, split_validation
from r1tune.data.encode import Example, PairExample, truncate
from r1tune.data.kinds import Sample
from r1tune.data.templates import apply_template_choice
from r1tune.errors import UserError
from r1tune.fileio import write_text_atomic
from r1tune.models.value_head import VALUE_HEAD_FILE, has_value_head, load_value_head
from r1tune.ui import console, progress

ANSWER_KINDS = ("chat", "cls", "kto")  # conversations that end with the answer a reward model scores
GENERATION_KEYS = ("eval_robustness", "eval_mc_file")  # what needs generated answers or a language model's choices


def is_reward_model(cfg: RunConfig, folder: Path) -> bool:
    """A folder with a value head, or one the config says a `stage: rm` run wrote (which must then have one)."""
    return has_value_head(folder) or cfg.stage == "rm"


def evaluate_reward_model(cfg: RunConfig, folder: Path, out: Path) -> dict:
    """The reward metrics of the model in `folder` on the held-out records; predictions written to `out`."""
    if not has_value_head(folder):
        raise UserError(f"output_dir '{folder}' has no {VALUE_HEAD_FILE}, so a 'stage: rm' config cannot score with "
                        "it; finish the rm training (the head is saved at the end) or point output_dir at a finished "
                        "rm run")
    for key in GENERATION_KEYS:
        if getattr(cfg, key):
            raise UserError(f"{cfg.source}: '{key}' scores generated answers, and output_dir '{folder}' is a reward "
                            f"model ({VALUE_HEAD_FILE}) that scores given answers instead; remove '{key}'")
    samples = held_out_records(cfg)
    from r1tune.models.run_loading import load_run

    head = load_value_head(folder)  # safetensors only
    model, tokenizer = load_run(str(folder))
    apply_template_choice(tokenizer, cfg.template, cfg.source, needs_template=True)
    pairs, answers, dropped = encode_records(tokenizer, samples, cfg)
    if "eval_compare_base" in cfg.model_fields_set and cfg.eval_compare_base:
        console.print("note: the base model has no value head; only the reward model is scored", style="dim")
    if dropped:
        console.print(f"note: {dropped} held-out records skipped: their prompt fills cutoff_len, no answer token "
                      "left to score", style="dim")
    rows = [p.chosen for _, p in pairs] + [p.rejected for _, p in pairs] + [a for _, a in answers]
    what = " and ".join(f"{n} {name}" for n, name in ((len(pairs), "pairs"), (len(answers), "answers")) if n)
    scores = score_rows(model, head, rows, tokenizer.pad_token_id, cfg, f"reward scores of {what}")
    n = len(pairs)
    chosen, rejected, single = scores[:n], scores[n:2 * n], scores[2 * n:]
    out.mkdir(parents=True, exist_ok=True)
    write_predictions(out / "predictions_tuned.jsonl", pairs, answers, chosen, rejected, single)
    return reward_scores(chosen, rejected, single)


def held_out_records(cfg: RunConfig) -> list[Sample]:
    """eval_dataset (pairs and conversations alike), or the val_size split of dataset read as training read it;
    at most eval_max_samples. UserError for records a reward model cannot score."""
    if not cfg.eval_dataset and not cfg.val_size:
        raise UserError(f"{cfg.source}: r1tune eval needs held-out data; set eval_dataset (a file) or val_size "
                        "(the same split training used)")
    skipped = [] if cfg.on_bad_record == "skip" else None  # on_bad_record: skip leaves bad records out
    if cfg.eval_dataset:
        samples = load_samples(cfg.eval_dataset, cfg.dataset_dir, cfg.max_samples, skipped=skipped, seed=cfg.seed,
                               key="eval_dataset")
    else:
        samples = load_samples(cfg.dataset, cfg.dataset_dir, cfg.max_samples, skipped=skipped, stage=cfg.stage,
                               seed=cfg.seed, mix_strategy=cfg.mix_strategy, interleave_probs=cfg.interleave_probs)
        samples = split_validation(samples, cfg.val_size, cfg.seed, cfg.source)[1]
    for sample in samples:
        if sample.kind != "preference" and sample.kind not in ANSWER_KINDS:
            raise UserError(f"{sample.where}: the record is plain text with no prompt and answer; a reward model "
                            "scores chosen/rejected pairs or conversations that end with an answer")
    return samples[: cfg.eval_max_samples]


def encode_records(tokenizer, samples: list[Sample], cfg: RunConfig):
    """([(sample, PairExample)], [(sample, Example)], dropped): rows as training encodes them, cut to
    cutoff_len; a record whose answer (a pair: either answer) lost every token is dropped."""
    pairs, answers, dropped = [], [], 0
    for sample, example in zip(samples, encode_many(tokenizer, samples, cfg.empty_think)):
        if isinstance(example, PairExample):
            cut = PairExample(truncate(example.chosen, cfg.cutoff_len), truncate(example.rejected, cfg.cutoff_len))
            kept = cut.chosen.num_targets and cut.rejected.num_targets
            pairs += [(sample, cut)] if kept else []
        else:
            cut = truncate(example, cfg.cutoff_len)
            kept = cut.num_targets
            answers += [(sample, cut)] if kept else []
        dropped += not kept
    if not pairs and not answers:
        raise UserError(f"{cfg.source}: no held-out record has an answer token within cutoff_len "
                        f"({cfg.cutoff_len}); raise cutoff_len")
    return pairs, answers, dropped


@torch.no_grad()
def score_rows(model, head, rows: list[Example], pad_id: int, cfg: RunConfig, desc: str) -> list[float]:
    """Each row's reward, in batches of per_device_eval_batch_size, scored as training scores them."""
    from r1tune.models.attention import mask_format
    from r1tune.train import batching
    from r1tune.train.preference_stage import RewardModelLoss

    model.eval()
    device = next(model.parameters()).device
    head = head.to(device).eval()
    stage = RewardModelLoss(model, pad_id, cfg.chunked_loss, head)
    attn = mask_format(getattr(model.config, "_attn_implementation", None))
    size = cfg.per_device_eval_batch_size
    scores: list[float] = []
    for start in progress(range(0, len(rows), size), desc):
        batch = batching.collate(rows[start:start + size], pad_id, attn)
        scores += stage.scores({k: v.to(device) for k, v in batch.items()}).tolist()
    return scores


def reward_scores(chosen: list[float], rejected: list[float], single: list[float]) -> dict:
    """TRL's rewards/* means over the pairs (with their count), rewards/mean over the answers."""
    from r1tune.train.pref_losses import reward_metrics

    scores: dict = {}
    if chosen:
        sums = reward_metrics(torch.tensor(chosen), torch.tensor(rejected))
        count = sums.pop("count")
        scores.update({name: value / count for name, value in sums.items()}, pairs=int(count))
    if single:
        scores.update({"rewards/mean": sum(single) / len(single), "answers": len(single)})
    return scores


def write_predictions(path: Path, pairs, answers, chosen, rejected, single) -> None:
    """One line per record: its prompt, answer(s) and score(s)."""
    rows = []
    for (sample, _), good, bad in zip(pairs, chosen, rejected):
        rows.append({"where": sample.where, "question": _question(sample.messages), "chosen": sample.chosen,
                     "rejected": sample.rejected, "score_chosen": good, "score_rejected": bad,
                     "correct": good > bad})
    for (sample, _), score in zip(answers, single):
        rows.append({"where": sample.where, "question": _question(sample.messages[:-1]),
                     "answer": sample.messages[-1].get("content", ""), "score": score})
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _question(prompt: list[dict]) -> str:
    """The last user message of a prompt."""
    return next((m.get("content", "") for m in reversed(prompt) if m.get("role") == "user"), "")
