"""What each training stage needs from its data, declared in one place.

A stage names the record kinds it trains on, whether every record is read as plain text, whether it
needs a chat template, and what `long_samples: auto` means for it. Data reading, `r1tune data`,
config validation and `r1tune train` all ask this table instead of testing stage names; the stage's
training code lives in r1tune.train.stages and is registered there under the same name.
"""

from __future__ import annotations

from dataclasses import dataclass

# What a record of each kind is, for messages naming a stage that trains on it.
KIND_NAMES = {"chat": "a conversation", "cls": "a classification record (text + label)",
              "text": "plain text (pretraining data)", "preference": "a preference pair (chosen/rejected)",
              "kto": "a record with a KTO label (kto_tag)",
              "prompt": "a prompt for GRPO (a conversation up to the user's last message)"}


@dataclass(frozen=True)
class StageData:
    name: str
    kinds: tuple[str, ...]  # record kinds the stage trains on
    reads_text: bool  # every record is read as plain text (any text column), as pretraining does
    needs_template: bool  # records are rendered with a chat template
    long_samples: str  # what long_samples 'auto' means: 'chunk' into windows or 'truncate'
    description: str
    cached: bool = True  # its examples fit the tokenized cache (pairs are encoded in memory)
    saves: str = "the adapter or model"  # what output_dir gets besides logs
    rows: str = ""  # what each example is when it is several rows, each scored as a whole sequence ("": one row)
    eval_metrics: tuple[str, ...] = ("loss", "perplexity")  # what its held-out evaluation reports
    generates: bool = False  # its examples are prompts it completes while training (GRPO's rollouts)

    @property
    def packs(self) -> bool:
        """Whether `packing` may join its examples into shared rows: not when each example is rows scored whole."""
        return not self.rows

    @property
    def reads_one_kind(self) -> bool:
        """Every record is read as the one kind the stage trains on, so a missing field is named."""
        return len(self.kinds) == 1


PAIR_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
GRPO_METRICS = ("reward", "reward_std", "completions/mean_length", "completions/clipped_ratio")  # greedy, held out
KTO_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "kl")  # unpaired: no accuracies

STAGES = {
    "sft": StageData("sft", ("chat", "cls"), reads_text=False, needs_template=True, long_samples="truncate",
                     description="supervised fine-tuning on conversations (and text+label classification records)"),
    "pt": StageData("pt", ("text",), reads_text=True, needs_template=False, long_samples="chunk",
                    description="continued pretraining on plain text, every token trained"),
    "dpo": StageData("dpo", ("preference",), reads_text=False, needs_template=True, long_samples="truncate",
                     description="preference optimisation on chosen/rejected pairs (pref_loss: sigmoid DPO, hinge, "
                                 "ipo, orpo, simpo)", cached=False,
                     rows="a chosen and a rejected row", eval_metrics=PAIR_METRICS + ("choice_accuracy",)),
    "kto": StageData("kto", ("kto",), reads_text=False, needs_template=True, long_samples="truncate",
                     description="KTO on single answers labelled desirable or not (kto_tag)",
                     rows="an answer row and its mismatched row (for the KL estimate)",
                     eval_metrics=KTO_METRICS),
    "rm": StageData("rm", ("preference",), reads_text=False, needs_template=True, long_samples="truncate",
                    description="a pairwise reward model: a value head scores answers, chosen above rejected",
                    cached=False, saves="the adapter or model and value_head.safetensors",
                    rows="a chosen and a rejected row", eval_metrics=PAIR_METRICS + ("accuracy",)),
    "grpo": StageData("grpo", ("prompt",), reads_text=False, needs_template=True, long_samples="truncate",
                      description="GRPO, reinforcement learning as DeepSeek-R1 was trained: num_generations sampled "
                                  "completions per prompt scored by reward_funcs (see docs/grpo.md)",
                      cached=False, rows="a prompt and its sampled completions", eval_metrics=GRPO_METRICS,
                      generates=True),
}


def stage_data(name: str) -> StageData:
    return STAGES[name]


def wrong_kind_message(kind: str, stage: str) -> str:
    """Why a record of `kind` cannot train `stage`, and what to do (a stage that takes it, if any)."""
    takers = [s.name for s in STAGES.values() if kind in s.kinds]
    fix = (f"set 'stage: {takers[0]}'" if takers else
           "no r1tune stage trains on it yet ('r1tune data stats' and 'data preview' read it)")
    return f"is {KIND_NAMES[kind]}, which stage '{stage}' does not train on: {fix}"
