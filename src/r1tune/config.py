"""The run configuration: one flat YAML file, validated strictly, its keys grouped in sections.

Key names follow LLaMA-Factory / Hugging Face TrainingArguments where the two tools
share an option, so a LLaMA-Factory YAML works unchanged for those options.
`docs/config.md` is generated from this schema (`python -m r1tune.config`) and a
test keeps the two in sync.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, NamedTuple, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, model_validator

from r1tune.errors import UserError, did_you_mean
from r1tune.process import is_main
from r1tune.stages import STAGES, stage_data

# Keys other tools accept that change nothing in an r1tune run; accepted with a notice
# so that a LLaMA-Factory YAML runs unchanged.
NO_EFFECT_KEYS = {
    "dataloader_num_workers": "batches are built in-process",
    "save_only_model": "checkpoints always keep optimizer state so they can resume",
    "do_eval": "evaluation runs whenever val_size > 0",
    "eval_strategy": "evaluation follows eval_steps",
    "save_strategy": "saving follows save_steps",
    "logging_strategy": "logging follows logging_steps",
    "flash_attn": "the attention kernel is chosen by attn_implementation",
    "pissa_convert": "PiSSA adapters are always saved converted to a plain LoRA on the original base",
}
# LLaMA-Factory quantizes exports with GPTQ, which calibrates on data; r1tune's bitsandbytes export needs none.
NO_EFFECT_KEYS.update(dict.fromkeys(
    ("export_quantization_dataset", "export_quantization_nsamples", "export_quantization_maxlen"),
    "export_quantization_bit uses bitsandbytes, which needs no calibration data"))


class _Section(BaseModel):
    """A group of run-file keys. The file stays flat (LLaMA-Factory style); sections only group the keys
    for docs/config.md and let a stage read its own keys (RunConfig.section)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelArgs(_Section):
    """The base model: where it comes from, how it is loaded, its chat template and added tokens."""

    model_name_or_path: str = Field(description="Local model folder or Hugging Face hub id of the base model.")
    tiny_arch: Optional[Literal["deepseek_v3", "qwen2", "llama"]] = Field(
        None, description="If model_name_or_path does not exist, first build a tiny random model of this architecture there (offline demos and tests).")
    trust_remote_code: bool = Field(False, description="Allow model code from the checkpoint folder to run. Off by default for safety.")
    attn_implementation: Optional[Literal["eager", "sdpa", "flash_attention_2"]] = Field(
        None, description="Attention kernel; empty lets transformers choose (SDPA where supported).")
    template: str = Field("auto", description="Chat template: 'auto' uses the tokenizer's own; or deepseek_r1, deepseek_r1_nothink, deepseek_v3, qwen, chatml, llama3, alpaca (LLaMA-Factory aliases deepseekr1, deepseek3, default = auto). See docs/data.md.")
    empty_think: Literal["mask", "train", "omit"] = Field(
        "mask", description="Final answers without <think> reasoning, when the template opens '<think>\\n' in the prompt: 'mask' adds an empty think block that is not trained, 'train' adds it and trains on it, 'omit' drops the think block.")
    add_tokens: Optional[str] = Field(None, description="Comma-separated domain tokens to add to the vocabulary (embeddings are resized and the new rows trained, with LoRA too).")
    add_tokens_file: Optional[str] = Field(None, description="A UTF-8 file of domain tokens to add, one per line ('#' lines are comments). Pure numbers are skipped; tokens with Latin/digit edges only match whole words, so numbers never split differently.")


class MethodArgs(_Section):
    """The training stage and the fine-tuning method: what trains (LoRA and its variants, full, freeze, virtual tokens, bottleneck adapters, MoE experts)."""

    stage: Literal[tuple(STAGES)] = Field("sft", description="; ".join(f"'{s.name}': {s.description}" for s in STAGES.values()) + ".")
    do_train: bool = Field(True, description="Train; false only reads, checks and reports the data (LLaMA-Factory compatibility).")
    finetuning_type: Literal["lora", "full", "freeze", "adalora", "prompt_tuning", "prefix_tuning", "p_tuning", "bottleneck"] = Field(
        "lora", description="lora: PEFT LoRA adapter (with use_dora / use_rslora / pissa_init / QLoRA); full: every weight; freeze: only the top freeze_trainable_layers layers (or unfreeze_schedule); adalora: LoRA whose rank is re-allocated during training; prompt_tuning / prefix_tuning / p_tuning: PEFT virtual tokens; bottleneck: Houlsby adapters after attention and MLP (not mergeable). See docs/methods.md.")
    lora_rank: int = Field(8, ge=1, description="LoRA rank r.")
    lora_alpha: Optional[int] = Field(None, ge=1, description="LoRA alpha; empty means 2 x lora_rank.")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    lora_target: str = Field("all", description="'all', 'attention', 'mlp', or comma-separated module names (e.g. q_proj,v_proj).")
    lora_experts: Optional[bool] = Field(None, description="On MoE models, also adapt the fused routed-expert weights (mlp.experts.*) when the target covers the MLP. Empty: yes, except with use_dora / pissa_init / adalora, which PEFT cannot apply to fused experts (those then stay frozen, with a notice).")
    use_dora: bool = Field(False, description="DoRA: weight-decomposed LoRA (magnitude vector + LoRA direction).")
    use_rslora: bool = Field(False, description="rsLoRA: scale the LoRA update by alpha/sqrt(r) instead of alpha/r (stable at high ranks).")
    pissa_init: bool = Field(False, description="PiSSA: start LoRA from the principal singular vectors of each weight (the base keeps the residual); the saved adapter is converted to a plain LoRA of rank 2r on the original base, so it loads and merges like any LoRA.")
    pissa_iter: int = Field(16, ge=-1, description="PiSSA: fast SVD iterations; -1 computes the exact SVD.")
    loraplus_lr_ratio: Optional[float] = Field(None, gt=0, description="LoRA+: learning rate of the LoRA B matrices = learning_rate x this ratio (paper: 16).")
    loraplus_lr_embedding: float = Field(1e-6, gt=0, description="LoRA+: learning rate of LoRA B matrices on embedding layers.")
    additional_target: Optional[str] = Field(None, description="Comma-separated modules trained in full next to the adapter and saved with it (e.g. embed_tokens,lm_head or norm).")
    adapter_name_or_path: Optional[str] = Field(None, description="Existing LoRA adapter folder(s), comma-separated: all but the last are merged into the base; the last is trained further (or merged too when create_new_adapter).")
    create_new_adapter: bool = Field(False, description="With adapter_name_or_path: merge every given adapter into the base and train a fresh one on top.")
    quantization_bit: Optional[Literal[4, 8]] = Field(None, description="QLoRA: load the base linear layers in 4 or 8 bits through bitsandbytes (LoRA only). Fused MoE experts are not linear layers and stay unquantized.")
    quantization_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quantization: bool = Field(True, description="4-bit: quantize the quantization constants too (saves about 0.4 bits per weight).")
    quantization_method: Literal["bnb", "bitsandbytes"] = Field("bnb", description="Quantization backend; bitsandbytes is the one supported.")
    adalora_init_r: int = Field(12, ge=1, description="AdaLoRA: rank every module starts with.")
    adalora_target_r: int = Field(8, ge=1, description="AdaLoRA: average rank per module after pruning (the budget).")
    adalora_tinit: Optional[int] = Field(None, ge=0, description="AdaLoRA: steps of warmup before ranks are pruned; empty: 10% of the steps.")
    adalora_tfinal: Optional[int] = Field(None, ge=0, description="AdaLoRA: final steps with the rank allocation fixed; empty: 20% of the steps.")
    adalora_delta_t: int = Field(1, ge=1, description="AdaLoRA: steps between two budget re-allocations.")
    adalora_beta1: float = Field(0.85, gt=0, lt=1, description="AdaLoRA: smoothing of the importance scores.")
    adalora_beta2: float = Field(0.85, gt=0, lt=1, description="AdaLoRA: smoothing of the importance uncertainty.")
    adalora_orth_reg_weight: float = Field(0.5, ge=0, description="AdaLoRA: weight of the orthogonality penalty on P and Q.")
    num_virtual_tokens: int = Field(20, ge=1, description="prompt_tuning / prefix_tuning / p_tuning: number of virtual tokens.")
    prompt_tuning_init: Literal["random", "text", "sample_vocab"] = Field("random", description="prompt_tuning: start the virtual tokens at random, from the embeddings of prompt_tuning_init_text, or from random vocabulary embeddings.")
    prompt_tuning_init_text: Optional[str] = Field(None, description="prompt_tuning with init 'text': the text whose token embeddings start the virtual tokens (repeated or cut to num_virtual_tokens).")
    prefix_projection: bool = Field(False, description="prefix_tuning: produce the prefix through a two-layer MLP (reparameterisation) instead of training it directly.")
    encoder_hidden_size: Optional[int] = Field(None, ge=1, description="prefix_tuning with prefix_projection / p_tuning: hidden size of the prompt encoder; empty: the model's hidden size.")
    encoder_reparameterization_type: Literal["MLP", "LSTM"] = Field("MLP", description="p_tuning: the prompt encoder.")
    bottleneck_size: int = Field(64, ge=1, description="bottleneck: width of each adapter's down-projection.")
    bottleneck_where: Literal["both", "attention", "mlp"] = Field("both", description="bottleneck: put adapters after attention, after the MLP, or both, in every layer.")
    bottleneck_activation: Literal["gelu", "relu", "silu"] = Field("gelu", description="bottleneck: the nonlinearity between the projections.")
    freeze_trainable_layers: int = Field(2, description="For finetuning_type freeze: train the last N decoder layers (negative: the first N).")
    freeze_trainable_modules: str = Field("all", description="For finetuning_type freeze: 'all', or comma-separated module names inside the trained layers (e.g. mlp,self_attn or q_proj).")
    freeze_extra_modules: Optional[str] = Field(None, description="For finetuning_type freeze: modules outside the decoder layers to train too (e.g. embed_tokens,norm,lm_head).")
    unfreeze_schedule: Optional[list[dict]] = Field(None, description="Progressive unfreezing (finetuning_type freeze or lora): a list of {step: N or epoch: E, layers: K or 'all' (the top K layers), modules: 'all' / 'mlp' / 'self_attn' / names}; each entry adds what it names at that point, logged, and the new parameters join the optimizer. See docs/methods.md.")
    expert_ids: Optional[str] = Field(None, description="MoE: train only these routed experts: '0,3,5' in every MoE layer, or per layer '1:0,3;2:4-7'. Full weights (finetuning_type full) or their LoRA (lora).")
    expert_domain: Optional[str] = Field(None, description="MoE: train the experts listed for this domain in expert_domain_map.")
    expert_domain_map: Optional[str] = Field(None, description="MoE: a JSON file mapping domain -> expert ids (a list for every layer, or {layer: ids}).")
    expert_top_k: Optional[int] = Field(None, ge=1, description="MoE: train the k experts per layer that the training data routes most tokens to (measured by a routing pass before training).")
    train_router: bool = Field(False, description="MoE expert-selective tuning: also train the router (mlp.gate); frozen by default so the routing that chose the experts stays.")


    @property
    def adapt_experts(self) -> bool:
        """lora_experts, or when empty: yes unless the method has no fused-expert form in PEFT."""
        if self.lora_experts is not None:
            return self.lora_experts
        return not (self.use_dora or self.pissa_init or self.finetuning_type == "adalora")

    @property
    def effective_lora_alpha(self) -> int:
        return self.lora_alpha if self.lora_alpha is not None else 2 * self.lora_rank


class DpoArgs(_Section):
    """Preference stages: the preference loss and its reference model (pref_beta, pref_ftx and precompute_ref_log_probs serve kto too)."""

    pref_beta: float = Field(0.1, gt=0, description="DPO/KTO/ORPO/SimPO: beta, the strength of the preference term (how far the policy may move from the reference).")
    pref_ftx: float = Field(0.0, ge=0, description="DPO/KTO: weight of an SFT loss on the chosen (KTO: desirable) answers added to the preference loss.")
    pref_loss: Literal["sigmoid", "hinge", "ipo", "orpo", "simpo"] = Field(
        "sigmoid", description="DPO loss: sigmoid (DPO), hinge (SLiC), ipo (IPO, length-averaged log-probabilities), orpo (odds ratio, no reference model), simpo (SimPO, length-averaged, no reference model).")
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO: target reward margin gamma.")
    dpo_label_smoothing: float = Field(0.0, ge=0, le=0.5, description="cDPO: assumed share of flipped preference labels (pref_loss sigmoid only).")
    precompute_ref_log_probs: Optional[bool] = Field(None, description="The reference of dpo/kto. Empty: a fresh LoRA-family adapter is switched off (the base is the reference: no copy, one no-grad forward per micro-batch, measured faster than a pre-pass: 21.4-22.3 vs 24.8-25.2 s for a 400-pair epoch of bench/dpo_vs_trl.py's 3.8M Qwen2), anything else is precomputed. true: score every pair once before training (its time counts in train_runtime). false: a frozen copy of the model when there is no fresh adapter (twice the weights in memory). See docs/stages.md.")


class KtoArgs(_Section):
    """KTO stage: how much desirable and undesirable examples weigh (beta and the rest are in the dpo section)."""

    kto_chosen_weight: float = Field(1.0, gt=0, description="KTO: weight of the desirable (kto_tag true) examples' loss.")
    kto_rejected_weight: float = Field(1.0, gt=0, description="KTO: weight of the undesirable examples' loss.")


class GrpoArgs(_Section):
    """GRPO stage (TRL's GRPOConfig names): rollouts, rewards, the clipped loss and the guards against runs that learn nothing. Sampling uses temperature / top_p (empty temperature: 1.0 here). See docs/grpo.md."""

    reward_funcs: Optional[list[str]] = Field(None, description="Reward functions, summed with reward_weights: built-ins think_format (reasoning, </think>, then an answer; aware of templates that open <think> in the prompt), accuracy (the answer after </think> equals the record's answer / solution: exact, numeric or normalised math), length (DAPO soft overlong penalty); 'file.py:function' or 'module:function' called as TRL calls reward functions; or the output_dir of a 'stage: rm' run (its value head scores prompt + completion). A comma-separated string works too.")
    reward_weights: Optional[list[float]] = Field(None, description="One weight per reward function; empty: 1 each.")
    num_generations: int = Field(8, ge=2, description="Completions sampled per prompt (a group); per_device_train_batch_size counts completions and must be a multiple of it.")
    max_completion_length: int = Field(256, ge=1, description="Tokens a completion may have; a completion cut there counts as clipped (completions/clipped_ratio).")
    beta: float = Field(0.0, ge=0.0, description="Weight of the k3 KL term to the reference (the starting policy). 0 (TRL's default): no reference at all; under a fresh LoRA adapter the reference is the base with the adapter off (no copy), else a frozen copy.")
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = Field("dapo", description="How per-token losses are averaged: dapo (over all completion tokens of the optimizer step), bnpo (over each batch's tokens), grpo (per completion, then over completions), dr_grpo (sum / (completions x max_completion_length)).")
    epsilon: float = Field(0.2, gt=0.0, lt=1.0, description="Clipping range below 1 of the probability ratio (and above 1 unless epsilon_high is set).")
    epsilon_high: Optional[float] = Field(None, gt=0.0, description="Upper clipping range (DAPO's clip-higher, e.g. 0.28); empty: epsilon.")
    num_iterations: int = Field(1, ge=1, description="Optimizer steps on each batch of rollouts (TRL's mu); above 1 the ratio to the generating policy moves and clipping matters.")
    scale_rewards: Literal["group", "batch", "none"] = Field("group", description="Advantages: (reward - group mean) divided by the group's std (group), the batch's std (batch), or not at all (none, Dr. GRPO). true/false mean group/none.")
    mask_truncated_completions: bool = Field(False, description="Leave completions cut at max_completion_length out of the loss (DAPO).")
    overlong_buffer_len: Optional[int] = Field(None, ge=1, description="The length reward: the last this-many tokens before max_completion_length are penalised linearly down to -1; empty: a quarter of max_completion_length.")
    log_completions: bool = Field(True, description="Write a few prompts, completions and their rewards to completions.jsonl at every logging step.")
    num_completions_to_print: int = Field(4, ge=1, description="How many completions log_completions writes per logging step.")
    grpo_guard: Literal["warn", "stop", "off"] = Field("warn", description="When, over grpo_guard_window rounds of rollouts, the share of groups with equal rewards, of completions cut at max_completion_length, or of zero rewards stays above grpo_guard_threshold (the run learns nothing), warn naming the likely cause and the key to change; stop also saves a checkpoint and ends the run.")
    grpo_guard_window: int = Field(10, ge=1, description="Rounds of rollouts the guard looks back over (one per step unless num_iterations > 1).")
    grpo_guard_threshold: float = Field(0.9, gt=0.0, le=1.0, description="Share above which a guard signal counts as stuck.")
    generation_batch_rows: int = Field(64, ge=1, description="Rows the rollout decoder runs at once (waiting completions join as others finish).")

    @model_validator(mode="before")
    @classmethod
    def _trl_spellings(cls, data):
        """TRL's scale_rewards true/false and a comma-separated reward_funcs string."""
        if isinstance(data, dict):
            if isinstance(data.get("scale_rewards"), bool):
                data = {**data, "scale_rewards": "group" if data["scale_rewards"] else "none"}
            if isinstance(data.get("reward_funcs"), str):
                data = {**data, "reward_funcs": [f.strip() for f in data["reward_funcs"].split(",") if f.strip()]}
        return data


class RegularisationArgs(_Section):
    """Dropout, label smoothing and embedding noise while training."""

    embedding_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the token embeddings (training only).")
    attention_dropout: Optional[float] = Field(None, ge=0.0, lt=1.0, description="Dropout on the attention probabilities; empty keeps the model config's value.")
    ffn_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the output of every MLP / MoE block (training only).")
    label_smoothing_factor: float = Field(0.0, ge=0.0, lt=1.0, description="Label smoothing of the token cross-entropy (both loss paths).")
    neftune_noise_alpha: Optional[float] = Field(None, gt=0, description="NEFTune: add uniform noise of scale alpha/sqrt(tokens x hidden) to the embeddings while training (paper: 5).")


class DataArgs(_Section):
    """Which records are read, and how they are cut, packed, cached and split into training and validation."""

    dataset: Optional[str] = Field(None, description="A JSON/JSONL file path, or comma-separated names from dataset_dir/dataset_info.json. Required by r1tune train, eval and data; an export-only config (LLaMA-Factory's merge YAML) leaves it out.")
    dataset_dir: str = Field("data", description="Folder holding dataset_info.json and the files it names.")
    cutoff_len: int = Field(2048, ge=8, description="Maximum tokens per sample; longer samples are truncated (a sample left with no trained token is dropped).")
    max_samples: Optional[int] = Field(None, ge=1, description="Use at most this many records from each dataset.")
    eval_dataset: Optional[str] = Field(None, description="Validation data (same forms as 'dataset'); instead of val_size.")
    mix_strategy: Literal["concat", "interleave_under", "interleave_over"] = Field(
        "concat", description="Several datasets: 'concat' joins them; 'interleave_under' draws from them with interleave_probs until one runs out; 'interleave_over' until each has been used once (smaller ones repeat).")
    interleave_probs: Optional[str] = Field(None, description="Comma-separated draw probabilities for interleaving, one per dataset (e.g. '0.7,0.3'); empty means equal.")
    long_samples: Literal["auto", "truncate", "chunk"] = Field(
        "auto", description="Samples longer than cutoff_len: 'truncate', or 'chunk' into sliding windows of cutoff_len tokens (each token trained once); 'auto' chunks pretraining text and truncates conversations.")
    chunk_overlap: int = Field(0, ge=0, description="Tokens each window repeats from the previous one as context when chunking (must be less than half of cutoff_len).")
    packing: bool = Field(False, description="Pack several samples into each row of up to cutoff_len tokens; attention stays inside each sample (block-diagonal mask, positions restart). Stages sft and pt; dpo, kto and rm score each row as a whole sequence and refuse it.")
    neat_packing: bool = Field(False, description="LLaMA-Factory's name for contamination-free packing; same as packing (r1tune never lets packed samples attend to each other).")
    data_cache: bool = Field(True, description="Cache tokenized data on disk (memory-mapped), keyed by a hash of the data files, tokenizer, template and data options; a rerun with the same key skips tokenization.")
    data_cache_dir: Optional[str] = Field(None, description="Where the tokenized cache lives; empty uses $R1TUNE_CACHE/data or ~/.cache/r1tune/data.")
    overwrite_cache: bool = Field(False, description="Rebuild the tokenized cache entry even if one exists.")
    preprocessing_num_workers: Optional[int] = Field(None, ge=1, description="Worker processes that tokenize while the cache is built; empty or 1 tokenizes in-process (the tokenizer itself already uses every core).")
    balance_classes: bool = Field(False, description="Draw each epoch's samples with inverse class-frequency weights (classification labels / KTO tags), so every label is seen about equally often.")
    on_bad_record: Literal["error", "skip"] = Field(
        "error", description="A malformed record stops the run ('error'), or is skipped, counted per reason and written to output_dir/skipped_records.jsonl ('skip').")
    val_size: float = Field(0.0, ge=0.0, description="Held-out validation share: a fraction (< 1) or a record count (>= 1).")
    val_leakage: Literal["warn", "error", "ignore"] = Field(
        "warn", description="Validation prompts that training also has, exactly or nearly (MinHash similarity >= 0.8 of the normalised prompt text): 'warn' prints a warning with the count and examples, 'error' refuses to train (exit 2), 'ignore' says nothing. Checked by r1tune train and data check.")


    @property
    def use_packing(self) -> bool:
        return self.packing or self.neat_packing


class AugmentArgs(_Section):
    """Data augmentation, re-drawn every epoch (seeded); user turns only unless augment_targets."""

    augment_synonym_prob: float = Field(0.0, ge=0.0, le=1.0, description="Per word (Chinese: per table phrase) of user text: chance to replace it by a synonym from the bundled EN/ZH tables (or augment_synonyms_file).")
    augment_insert_prob: float = Field(0.0, ge=0.0, le=1.0, description="Per word: chance to insert a synonym of a word of the text next to it (random insertion).")
    augment_shuffle_window: int = Field(0, ge=0, description="Local shuffle: words (Chinese: clauses) move at most this many positions; 0 is off.")
    augment_template_rotation: float = Field(0.0, ge=0.0, le=1.0, description="Share of samples whose last user instruction is re-worded with a rotated instruction template (e.g. 0.1).")
    augment_instruction_templates: Optional[list[str]] = Field(None, description="Templates for augment_template_rotation, each holding '{instruction}'; empty uses bundled EN+ZH templates.")
    augment_synonyms_file: Optional[str] = Field(None, description="Your synonym table (TSV, one group per line) merged into the bundled one; a line '# r1tune: replace-bundled' replaces it.")
    augment_back_translate: Optional[str] = Field(None, description="'module:function' called as f(text, rng) -> text for back-translation through your own model (see docs/data.md).")
    augment_targets: bool = Field(False, description="Also augment the assistant's answers (never the <think> reasoning).")
    augment_ratio: float = Field(1.0, ge=0.0, le=1.0, description="Share of samples augmented at all in each epoch.")


    def augment_options(self) -> AugmentOptions:
        return AugmentOptions(
            synonym_prob=self.augment_synonym_prob, insert_prob=self.augment_insert_prob,
            shuffle_window=self.augment_shuffle_window, template_rotation=self.augment_template_rotation,
            instruction_templates=self.augment_instruction_templates, synonyms_file=self.augment_synonyms_file,
            back_translate=self.augment_back_translate, augment_targets=self.augment_targets, ratio=self.augment_ratio)


class OutputArgs(_Section):
    """Where the run writes."""

    output_dir: Optional[str] = Field(None, description="Where the adapter or model, tokenizer, logs, plots and checkpoints go. Required by r1tune train and eval; without it, export / chat / serve load model_name_or_path with adapter_name_or_path (LLaMA-Factory's export and inference YAML).")
    overwrite_output_dir: bool = Field(False, description="Allow training into an output_dir that already holds a trained model.")


class TrainingArgs(_Section):
    """Optimisation: batch sizes, optimizer, learning-rate schedule, precision and memory."""

    per_device_train_batch_size: int = Field(8, ge=1, description="Samples per micro-batch for training.")
    per_device_eval_batch_size: int = Field(8, ge=1, description="Samples per micro-batch for evaluation.")
    group_by_length: Optional[bool] = Field(None, description="Put samples of similar length in the same batch (less padding, same data each epoch). Empty: on when shuffled batches, after cutting into micro-batches (micro_batch_tokens), would still be >= 30% padding; homogeneous batches slow convergence (20M DeepSeek-V3 in bench/train_throughput.py: held-out loss 4.074 grouped vs 3.750 shuffled).")
    micro_batch_tokens: Optional[int] = Field(None, ge=0, description="Cut each batch into micro-batches of at most this many padded tokens (rows x longest row; one row at least) and accumulate their gradients: the same update with activation memory in proportion to this number. Empty: on CPU 512 for models with at least the matmul work per token of a 20M Qwen2 (hidden 512, 6 layers), more for smaller ones (in proportion to that work, in multiples of 512, at most 4,096; 3,072 for a 3.8M Qwen2, whose DPO epoch in bench/dpo_vs_trl.py took 20.9 s at 3,072 vs 26-27 s at 1,536) (20M Qwen2 in bench/train_throughput.py: 1.08 GB peak at 512 with heap trimming, 1.24 GB at 1,024 without, 2.81 GB uncut; 512 costs 2-10 % of step time vs 1,024, 9-12 % on the 20M DeepSeek-V3 (bench/micro_batch.py)); no cutting on GPU. 0: never cut.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step; the loss is normalised over all target tokens of the step.")
    optim: str = Field("adamw_torch", description="Optimizer: adamw_torch, adamw_torch_fused, lion_32bit (use a 3-10x smaller learning_rate), adamw_8bit / lion_8bit (bitsandbytes), adafactor. LLaMA-Factory / Hugging Face names are accepted.")
    learning_rate: float = Field(5e-5, gt=0.0, description="Peak learning rate.")
    num_train_epochs: float = Field(3.0, gt=0.0, description="Epochs to train (ignored when max_steps > 0).")
    max_steps: int = Field(-1, ge=-1, description="Total optimizer steps; -1 derives it from num_train_epochs.")
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field("linear", description="Learning-rate schedule after warmup.")
    warmup_ratio: float = Field(0.0, ge=0.0, le=1.0, description="Warmup as a fraction of total steps (used when warmup_steps is 0).")
    warmup_steps: int = Field(0, ge=0, description="Warmup steps; overrides warmup_ratio when > 0.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay (not applied to biases and norms).")
    max_grad_norm: float = Field(1.0, ge=0.0, description="Gradient clipping norm; 0 disables clipping.")
    bf16: Optional[bool] = Field(None, description="bfloat16 autocast with fp32 master weights. Empty: on where bf16 matmuls are native (CPUs with AVX-512 BF16 or AMX, GPUs that support bf16) and fp16 is off.")
    fp16: bool = Field(False, description="float16 autocast with loss scaling (CUDA only).")
    chunked_loss: Optional[bool] = Field(None, description="Compute the loss from the hidden states in chunks of rows, scoring only labelled positions and taking the gradient in the forward pass (no full logits: far less memory for large vocabularies). Empty: on for Llama/Qwen2/Qwen3/Mistral/DeepSeek-V3 heads, off otherwise.")
    gradient_checkpointing: Optional[bool] = Field(None, description="Recompute activations in the backward pass to save memory (about 25% slower). Empty: on only when the estimated activations of the largest micro-batch exceed memory_budget_gb.")
    memory_budget_gb: Optional[float] = Field(None, gt=0, description="Activation memory allowed before gradient checkpointing turns itself on; empty: half of the memory available at start.")
    seed: int = Field(42, description="Seed for initialisation, data order, splits and dropout.")


class DistributedArgs(_Section):
    """Several processes (docs/distributed.md): started by `r1tune train` with FORCE_TORCHRUN=1 / NPROC_PER_NODE /
    NNODES, or by torchrun / accelerate launch. Each process trains on its share of every step; the global batch is
    per_device_train_batch_size x gradient_accumulation_steps x processes."""

    ddp_timeout: int = Field(1800, ge=1, description="Seconds a process waits for the others at a synchronisation point before the job fails (Hugging Face's default 1800).")
    ddp_backend: Optional[Literal["nccl", "gloo"]] = Field(None, description="torch.distributed backend; empty: nccl on GPUs, gloo on CPUs.")
    deepspeed: Optional[Any] = Field(None, description="DeepSpeed ZeRO: a JSON config file (LLaMA-Factory's ds_z0/z2/z2_offload/z3/z3_offload_config.json work unchanged; copies in examples/distributed/) or a mapping. \"auto\" values are filled from this file as Hugging Face's Trainer fills them; r1tune keeps its own optimizer and schedule, so the config has no optimizer or scheduler section. Needs `pip install deepspeed` (docs/distributed.md).")
    fsdp: Optional[Any] = Field(None, description="Shard the decoder over the processes with torch's FSDP2: 'full_shard auto_wrap' (weights, gradients and optimizer state sharded; ZeRO-3 style) or 'shard_grad_op auto_wrap' (gathered weights kept from forward to backward; ZeRO-2 style), optionally with 'offload' (CPU). Each decoder layer is one unit; the output head stays whole. Not with stage grpo (docs/distributed.md).")
    fsdp_config: Optional[Any] = Field(None, description="FSDP options (a mapping or a JSON file, Hugging Face's names with or without the fsdp_ prefix): transformer_layer_cls_to_wrap (default: the model's _no_split_modules), reshard_after_forward, offload_params; fsdp_version must be 2 if given.")


class EvalArgs(_Section):
    """Evaluation during training, and what it stops or adjusts (early stopping, learning-rate plateaus, gradient alarms)."""

    eval_steps: Optional[int] = Field(None, ge=1, description="Evaluate every N steps (needs val_size > 0); empty evaluates only at the end.")
    early_stopping_patience: Optional[int] = Field(None, ge=1, description="Stop after this many evaluations without a lower eval loss.")
    eval_generate_samples: int = Field(0, ge=0, description="Before and after training, generate answers for this many validation prompts and report exact-match accuracy; with generate_metrics_steps also during training.")
    generate_metrics_steps: Optional[int] = Field(None, ge=1, description="Every N steps, generate answers for eval_generate_samples (default 16) validation prompts and log exact match, accuracy, BLEU-4 and ROUGE-L (trainer_log.jsonl and TensorBoard); these metrics then count for metric_for_best_model.")
    metric_for_best_model: Optional[str] = Field(None, description="What early stopping and lr_plateau_patience watch at each evaluation (empty: loss; reward for grpo): loss, perplexity, or (with generate_metrics_steps) exact_match, accuracy, bleu4, rouge_l; dpo/kto/rm: loss, rewards/chosen, rewards/rejected, rewards/margins, and rewards/accuracies + choice_accuracy (dpo), kl (kto), rewards/accuracies + accuracy (rm); grpo: reward, reward_std, completions/mean_length, completions/clipped_ratio.")
    greater_is_better: Optional[bool] = Field(None, description="Whether a larger metric_for_best_model is better; empty: false for loss/perplexity/rewards/rejected, true otherwise.")
    lr_plateau_patience: Optional[int] = Field(None, ge=1, description="Multiply the learning rate by lr_plateau_factor after this many evaluations without improvement of metric_for_best_model.")
    lr_plateau_factor: float = Field(0.5, gt=0.0, lt=1.0, description="Learning-rate factor applied on each plateau.")
    grad_norm_alarm: Literal["off", "warn", "stop"] = Field("warn", description="Per-layer gradient norms are tracked every step (logged every logging_steps); when one rises above grad_norm_alarm_std standard deviations of its running history: 'warn' prints and logs it, 'stop' also saves a checkpoint and stops.")
    grad_norm_alarm_std: float = Field(3.0, gt=0.0, description="The alarm band, in standard deviations of the last 100 steps (after 10 steps of warmup).")
    grad_norm_alarm_ratio: float = Field(3.0, ge=0.0, description="A rising norm must also be at least this many times its running mean to alarm (0: the std band alone). Healthy runs stray 3-4.5 std and up to 2.04x (bench/grad_alarm.py: the quickstart's 250 steps gave 2-3 alarms at 3 std alone, 0-1 with 2x, none with 3x; a run at a too-high learning rate alarmed alike under every rule).")
    update_heatmap: Optional[bool] = Field(None, description="Track each module group's relative update size ||dW||/||W|| and write update_heatmap.png (module group x step) at the end. Empty: on when under 10% of the weights train (it keeps a copy of the trainable weights at sampled steps).")
    max_new_tokens: int = Field(128, ge=1, description="Generation limit for eval_generate_samples.")


class EvalCommandArgs(_Section):
    """r1tune eval: scoring the trained model on held-out data, multiple choice and perturbed prompts, with its generation settings (a reward model's value head scores pairs and answers instead; docs/eval.md)."""

    eval_max_samples: Optional[int] = Field(200, ge=1, description="r1tune eval: score at most this many held-out conversations (eval_dataset, or the val_size split of dataset).")
    eval_compare_base: bool = Field(True, description="r1tune eval: also score the base model on the same prompts and report the differences (not for a reward model, whose value head the base lacks).")
    do_sample: bool = Field(False, description="Generation: sample instead of greedy decoding.")
    temperature: Optional[float] = Field(None, gt=0.0, description="Generation: sampling temperature of r1tune eval with do_sample (empty: 0.7) and of GRPO's rollouts (empty: 1.0, as TRL).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Generation: nucleus sampling share (r1tune eval with do_sample, GRPO's rollouts).")
    eval_mc_file: Optional[str] = Field(None, description="r1tune eval: a multiple-choice file (MMLU / C-Eval style JSONL: question, choices, answer) scored by log-likelihood; 'bundled' uses r1tune's small sample.")
    eval_mc_shots: int = Field(0, ge=0, description="r1tune eval: solved examples put before each multiple-choice question (few-shot).")
    eval_robustness: Optional[str] = Field(None, description="r1tune eval: comma-separated perturbations of the prompts (typos, synonyms, char_noise, distractor, or 'all'); accuracy under each is reported beside clean accuracy.")
    eval_robustness_rate: float = Field(0.1, ge=0.0, le=1.0, description="r1tune eval: share of words / characters a perturbation touches.")
    eval_thresholds: Optional[list[str]] = Field(None, description="r1tune eval: gates like 'bleu4 >= 0.45', 'ppl_drop >= 0.35', 'f1_gain >= 0.15', 'robust_accuracy >= 0.88'; any FAIL makes the command exit with code 1.")
    eval_output_dir: Optional[str] = Field(None, description="r1tune eval: where predictions and the report go; empty: OUTPUT_DIR/eval.")


class ExportArgs(_Section):
    """r1tune export: merging the trained model and writing quantized, ONNX, int8 and GGUF copies."""

    export_dir: Optional[str] = Field(None, description="r1tune export: where the merged model, tokenizer, generation config and model card go; empty: OUTPUT_DIR/merged (required without output_dir). Its old contents are replaced.")
    export_size: float = Field(5.0, gt=0, description="r1tune export: largest safetensors shard in GB (LLaMA-Factory's key).")
    export_legacy_format: bool = Field(False, description="LLaMA-Factory's key for .bin files; r1tune writes safetensors only, so it must stay false.")
    export_device: Literal["cpu", "auto"] = Field("cpu", description="r1tune export: where adapters are merged: 'cpu', or 'auto' (CUDA when available, else the CPU with a notice). The parity check runs on the CPU in fp32 either way.")
    export_quantization_bit: Optional[Literal[4, 8]] = Field(None, description="r1tune export: also write EXPORT_DIR/bnb-4bit (nf4, double quantization) or bnb-8bit (LLM.int8) with bitsandbytes, reloadable with plain transformers, and report its size and perplexity against fp32. Replaces LLaMA-Factory's GPTQ, so no calibration data is needed; nn.Linear layers only (embeddings, output head and DeepSeek-V3's fused routed experts stay fp32).")
    export_onnx: bool = Field(False, description="r1tune export: also write merged/onnx/model.onnx (logits of a full-sequence forward, no KV cache), validated with onnxruntime against PyTorch.")
    export_int8: bool = Field(False, description="r1tune export: also write merged/int8 (int8 weights + per-channel scales in safetensors, activations quantized on the fly; for CPU inference) and report its size, tokens/s and perplexity against the fp32 model.")
    export_gguf: bool = Field(False, description="r1tune export: also write merged/model.gguf (f16) and an Ollama Modelfile with the R1 template and stop tokens (Qwen2 and Llama architectures).")
    model_license: Optional[str] = Field(None, description="r1tune export: the license field of the model card (e.g. mit, apache-2.0); empty: 'other', to be filled in.")


class ServeArgs(_Section):
    """r1tune serve: the served model names, request batching and request limits."""

    serve_model_name: Optional[str] = Field(None, description="r1tune serve: the `model` name of the run's model in requests; empty: the output_dir folder's name (or the adapter's / base's name).")
    serve_adapters: Optional[dict[str, str]] = Field(None, description="r1tune serve: more LoRA adapters over the same base, {name: adapter folder or r1tune output_dir}, kept in memory together and chosen by each request's `model` field.")
    serve_base_name: Optional[str] = Field(None, description="r1tune serve: also serve the base model (adapters off) under this `model` name.")
    serve_max_batch_size: int = Field(32, ge=1, description="r1tune serve: most requests generated together in one batch; new requests join a running batch between decoding steps.")
    serve_batch_wait_ms: float = Field(5.0, ge=0, description="r1tune serve: how long an idle server waits after the first request for others to start a batch with.")
    serve_max_queue: int = Field(256, ge=1, description="r1tune serve: requests allowed to wait for a batch seat; more get HTTP 429.")
    serve_max_tokens: int = Field(2048, ge=1, description="r1tune serve: the largest max_tokens a request may ask for (also the default).")
    serve_max_prompt_tokens: int = Field(4096, ge=1, description="r1tune serve: the longest prompt accepted, in tokens (HTTP 400 above).")
    serve_max_body_bytes: int = Field(1_000_000, ge=1, description="r1tune serve: the largest request body accepted (HTTP 413 above).")


class LoggingArgs(_Section):
    """Logging, checkpoints and resuming."""

    logging_steps: int = Field(10, ge=1, description="Log loss, learning rate and tokens/s every N steps.")
    save_steps: int = Field(500, ge=1, description="Write a resumable checkpoint every N steps.")
    save_total_limit: Optional[int] = Field(None, ge=1, description="Keep only the newest N checkpoints.")
    plot_loss: bool = Field(True, description="Write training_loss.png (and eval loss) to output_dir at the end.")
    report_to: str = Field("tensorboard", description="'tensorboard' writes event files to output_dir/runs; 'none' disables them.")
    resume_from_checkpoint: Optional[str] = Field(None, description="'auto' resumes from the newest checkpoint in output_dir; or a checkpoint folder path.")


# Section name -> class, in the order docs/config.md lists them (and the run file's keys are saved in).
SECTIONS: dict[str, type[BaseModel]] = {
    "model": ModelArgs, "method": MethodArgs, "dpo": DpoArgs, "kto": KtoArgs, "grpo": GrpoArgs, "regularisation": RegularisationArgs,
    "data": DataArgs, "augment": AugmentArgs, "output": OutputArgs, "training": TrainingArgs, "distributed": DistributedArgs,
    "evaluation": EvalArgs,
    "eval": EvalCommandArgs, "export": ExportArgs, "serve": ServeArgs, "logging": LoggingArgs,
}

# Keys that only mean something for some training stages (stage 'rm' and the rest have none of their own).
# Set for another stage, one only gets a notice: a LLaMA-Factory YAML whose stage was switched still runs.
STAGE_KEYS: dict[str, list[str]] = {
    "dpo": ["pref_beta", "pref_ftx", "pref_loss", "simpo_gamma", "dpo_label_smoothing", "precompute_ref_log_probs"],
    "kto": ["pref_beta", "pref_ftx", "kto_chosen_weight", "kto_rejected_weight", "precompute_ref_log_probs"],
    "grpo": [name for name in GrpoArgs.model_fields],
}


# Pydantic orders the fields of a class with several bases from the last base to the first, so the sections
# are listed here in reverse: model_fields (and the saved run file) then follow SECTIONS. A test checks it.
class RunConfig(LoggingArgs, ServeArgs, ExportArgs, EvalCommandArgs, EvalArgs, DistributedArgs, TrainingArgs, OutputArgs,
                AugmentArgs,
                DataArgs, RegularisationArgs, GrpoArgs, KtoArgs, DpoArgs, MethodArgs, ModelArgs):
    """Every key of a run file: the union of SECTIONS. Descriptions become docs/config.md."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    _source: str = PrivateAttr("config")  # the YAML file, named in error messages

    @model_validator(mode="after")
    def _check_combinations(self, info: ValidationInfo) -> "RunConfig":
        # Every contradiction at once, so a file with several is fixed in one go (validate_config lists them).
        source = (info.context or {}).get("source", "config")
        problems = [*_combination_problems(self), *method_option_problems(self, source),
                    *stage_option_problems(self, source)]
        if problems:
            raise ConfigProblems(problems)
        return self

    @property
    def source(self) -> str:
        return self._source

    def section(self, name: str) -> BaseModel:
        """The keys of section `name` (see SECTIONS) as an instance of its class, for a stage to read its own."""
        cls = SECTIONS[name]
        return cls.model_construct(self.model_fields_set & set(cls.model_fields),
                                   **{key: getattr(self, key) for key in cls.model_fields})

    @property
    def best_metric(self) -> str:
        """metric_for_best_model, or the stage's first held-out metric (loss; GRPO: reward)."""
        return self.metric_for_best_model or stage_data(self.stage).eval_metrics[0]

    def stage_options(self, stage: str | None = None) -> dict[str, Any]:
        """The keys STAGE_KEYS gives `stage` (default: this run's stage) and their values."""
        return {key: getattr(self, key) for key in STAGE_KEYS.get(stage or self.stage, [])}

    def require(self, *keys: str, command: str) -> None:
        """UserError for the first of `keys` left empty: dataset and output_dir are optional so that an
        export-only YAML validates, and the commands that need them check here, before any work."""
        for key in keys:
            if getattr(self, key) in (None, ""):
                raise UserError(f"{missing_key_message(self.source, key)} ({command} needs it)")


class ConfigProblems(ValueError):
    """Several cross-key problems found together. Pydantic wraps it in its ValidationError;
    _validation_problems takes the list back out so each gets its own line."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


def _combination_problems(cfg: RunConfig) -> Iterator[str]:
    yield from _training_problems(cfg)
    yield from _fsdp_problems(cfg)
    yield from _evaluation_problems(cfg)
    yield from _data_problems(cfg)
    if cfg.export_legacy_format:
        yield ("'export_legacy_format' asks for pickle-based .bin files; r1tune writes safetensors only "
               "(safe to load anywhere), so remove the key or set it false")


def _training_problems(cfg: RunConfig) -> Iterator[str]:
    if cfg.bf16 and cfg.fp16:
        yield "bf16 and fp16 cannot both be true; pick one"
    if cfg.report_to not in ("tensorboard", "none", "all"):
        yield f"report_to must be 'tensorboard', 'all' or 'none' (got '{cfg.report_to}')"
    if cfg.max_steps == 0:
        yield "max_steps must be a positive number of steps, or -1 to use num_train_epochs"


# What sharded training (FSDP, DeepSpeed ZeRO) cannot do here, with why (docs/distributed.md): stages and methods
# that need every process's forwards to differ, or whole weights or gradients outside a forward.
SHARDING_REFUSED = {
    "stage grpo": "each process samples rollouts of its own length, but sharded weights need every process in every forward",
    "finetuning_type bottleneck": "the adapters are saved from the whole weights",
    "finetuning_type adalora": "its rank allocation reads whole weights between steps",
    "prompt, prefix and p-tuning": "the virtual tokens live outside the sharded decoder",
    "quantization_bit": "bitsandbytes' quantized weights cannot be sharded",
    "pissa_init": "PiSSA's conversion at save reads the whole weights",
    "unfreeze_schedule": "sharding fixes which weights train when it starts",
    "expert_ids / expert_domain": "expert selection masks gradients of whole expert weights",
}


def sharding_refusals(cfg: RunConfig, grpo: bool = True) -> list[str]:
    """The SHARDING_REFUSED entries this run file has (`grpo`: whether stage grpo counts)."""
    found = {"stage grpo": grpo and cfg.stage == "grpo", "finetuning_type bottleneck": cfg.finetuning_type == "bottleneck",
             "finetuning_type adalora": cfg.finetuning_type == "adalora",
             "prompt, prefix and p-tuning": cfg.finetuning_type in ("prompt_tuning", "prefix_tuning", "p_tuning"),
             "quantization_bit": bool(cfg.quantization_bit), "pissa_init": cfg.pissa_init,
             "unfreeze_schedule": bool(cfg.unfreeze_schedule),
             "expert_ids / expert_domain": bool(cfg.expert_ids or cfg.expert_domain)}
    return [what for what, on in found.items() if on]


def refusal_message(key: str, what: str) -> str:
    return (f"'{key}' cannot be combined with {what} ({SHARDING_REFUSED[what]}); remove '{key}' to train with "
            "plain data parallelism (every process holds the whole model)")


def _fsdp_problems(cfg: RunConfig) -> Iterator[str]:
    if cfg.fsdp and cfg.deepspeed:
        yield "give either 'fsdp' or 'deepspeed', not both"
    if cfg.fsdp:
        yield from (refusal_message("fsdp", what) for what in sharding_refusals(cfg))
    if cfg.deepspeed:  # ZeRO-3 also refuses grpo; its stage is in the file (checked when training starts)
        yield from (refusal_message("deepspeed", what) for what in sharding_refusals(cfg, grpo=False))


def _evaluation_problems(cfg: RunConfig) -> Iterator[str]:
    held_out = cfg.val_size != 0 or bool(cfg.eval_dataset)
    for key in ("eval_steps", "early_stopping_patience", "eval_generate_samples"):
        if not held_out and getattr(cfg, key):
            yield f"'{key}' needs held-out data; set val_size (e.g. 0.1) or eval_dataset, or remove '{key}'"
    if cfg.eval_dataset and cfg.val_size:
        yield "give either 'eval_dataset' or 'val_size', not both"
    if cfg.generate_metrics_steps and not held_out:
        yield "'generate_metrics_steps' needs held-out data; set val_size (e.g. 0.1) or eval_dataset"
    stage = stage_data(cfg.stage)
    if cfg.generate_metrics_steps and stage.rows:
        yield (f"'generate_metrics_steps' is for sft and pt; stage '{cfg.stage}' measures its held-out "
               f"{', '.join(stage.eval_metrics)} at every evaluation instead; remove it")
    watched = set(stage.eval_metrics) | ({"exact_match", "accuracy", "bleu4", "rouge_l"}
                                          if cfg.generate_metrics_steps and not stage.rows else set())
    if cfg.best_metric not in watched:
        yield (f"'metric_for_best_model' is '{cfg.best_metric}', which no evaluation of this run "
               f"measures; choose one of {', '.join(sorted(watched))}"
               + ("" if stage.rows else " (generation metrics need generate_metrics_steps)"))
    for key in ("lr_plateau_patience", "early_stopping_patience"):
        if getattr(cfg, key) and not cfg.eval_steps:
            yield f"'{key}' needs 'eval_steps' (how often to evaluate)"


def _data_problems(cfg: RunConfig) -> Iterator[str]:
    if cfg.chunk_overlap * 2 >= cfg.cutoff_len:
        yield f"'chunk_overlap' ({cfg.chunk_overlap}) must be less than half of cutoff_len ({cfg.cutoff_len})"
    if cfg.augment_options().enabled() and not stage_data(cfg.stage).rows and (
            cfg.use_packing or cfg.long_samples == "chunk" or stage_data(cfg.stage).reads_text):
        yield ("augmentation re-encodes samples every epoch and works with truncated conversations only; "
               "turn off packing / long_samples: chunk (or the augment_* keys)")
    if stage_data(cfg.stage).rows:
        for key, on in (("augment_*", cfg.augment_options().enabled()), ("long_samples: chunk", cfg.long_samples == "chunk")):
            if on:
                yield (f"'{key}' cannot be used with stage '{cfg.stage}': each example is "
                       f"{stage_data(cfg.stage).rows}, kept whole; remove it")
    if cfg.use_packing and not stage_data(cfg.stage).packs:
        key = "packing" if cfg.packing else "neat_packing"
        yield (f"'{key}' cannot be used with stage '{cfg.stage}': each example is {stage_data(cfg.stage).rows}, "
               f"each scored as a whole sequence, not samples to join into shared rows; remove '{key}'")
    if cfg.balance_classes and cfg.use_packing:
        yield "'balance_classes' re-draws samples every epoch and cannot be combined with packing; turn one off"


# Keys that only mean something for some fine-tuning types: setting one for another type is an error.
METHOD_KEYS = {
    ("lora",): ["lora_rank", "use_dora", "use_rslora", "pissa_init", "pissa_iter", "adapter_name_or_path",
                "create_new_adapter"],
    ("lora", "adalora"): ["lora_alpha", "lora_target", "lora_experts", "lora_dropout", "loraplus_lr_ratio", "loraplus_lr_embedding",
                          "additional_target", "quantization_bit", "quantization_type", "double_quantization"],
    ("adalora",): ["adalora_init_r", "adalora_target_r", "adalora_tinit", "adalora_tfinal", "adalora_delta_t",
                   "adalora_beta1", "adalora_beta2", "adalora_orth_reg_weight"],
    ("prompt_tuning", "prefix_tuning", "p_tuning"): ["num_virtual_tokens"],
    ("prompt_tuning",): ["prompt_tuning_init", "prompt_tuning_init_text"],
    ("prefix_tuning",): ["prefix_projection"],
    ("prefix_tuning", "p_tuning"): ["encoder_hidden_size"],
    ("p_tuning",): ["encoder_reparameterization_type"],
    ("bottleneck",): ["bottleneck_size", "bottleneck_where", "bottleneck_activation"],
    ("freeze",): ["freeze_trainable_layers", "freeze_trainable_modules", "freeze_extra_modules"],
    ("freeze", "lora"): ["unfreeze_schedule"],
    ("full", "lora"): ["expert_ids", "expert_domain", "expert_domain_map", "expert_top_k", "train_router"],
}


# Of those, the keys that change what is loaded or trained: for another type they are errors, not notices.
WHAT_TRAINS_KEYS = {"quantization_bit", "adapter_name_or_path", "create_new_adapter", "unfreeze_schedule",
                    "expert_ids", "expert_domain", "expert_top_k", "train_router", "additional_target",
                    "use_dora", "pissa_init"}


def check_method_options(cfg: RunConfig, source: str = "config") -> None:
    """ConfigProblems (a ValueError) listing every problem method_option_problems finds."""
    problems = list(method_option_problems(cfg, source))
    if problems:
        raise ConfigProblems(problems)


def method_option_problems(cfg: RunConfig, source: str = "config") -> Iterator[str]:
    """Options of one fine-tuning method set for another, or options that contradict each other.

    A hyperparameter of another method (lora_rank with full, say) only gets a notice, so a
    LLaMA-Factory YAML whose finetuning_type was switched still runs."""
    yield from _other_method_problems(cfg, source)
    yield from _adapter_problems(cfg)
    yield from _expert_problems(cfg)
    if cfg.unfreeze_schedule is not None:
        if "freeze_trainable_layers" in cfg.model_fields_set:
            yield "give either 'freeze_trainable_layers' or 'unfreeze_schedule', not both"
        try:
            parse_schedule(cfg.unfreeze_schedule)
        except ValueError as exc:  # names the malformed entry
            yield str(exc)
    if cfg.optim not in OPTIMIZERS:
        yield (f"'optim' is '{cfg.optim}'; choose one of {', '.join(sorted(OPTIMIZERS))}"
               f"{did_you_mean(cfg.optim, OPTIMIZERS)}")


def _other_method_problems(cfg: RunConfig, source: str) -> Iterator[str]:
    for types, keys in METHOD_KEYS.items():
        for key in keys:
            if key in cfg.model_fields_set and cfg.finetuning_type not in types and getattr(cfg, key) not in (None, False):
                what = f"'{key}' applies to finetuning_type {' / '.join(types)}, not '{cfg.finetuning_type}'"
                if key in WHAT_TRAINS_KEYS:
                    yield f"{what}; remove '{key}' or change finetuning_type"
                else:
                    note(f"{source}: {what}; it has no effect")


def _adapter_problems(cfg: RunConfig) -> Iterator[str]:
    if cfg.pissa_init and cfg.quantization_bit:
        yield ("'pissa_init' rewrites the base weights and cannot be used with a quantized base "
               "(quantization_bit); remove one of them")
    if cfg.lora_experts and (cfg.use_dora or cfg.pissa_init or cfg.finetuning_type == "adalora"):
        yield ("PEFT has no DoRA, PiSSA or AdaLoRA for fused MoE experts; set lora_experts: false "
               "(or leave it empty) to apply the method to every other linear layer")
    if (cfg.add_tokens or cfg.add_tokens_file) and cfg.finetuning_type not in ("lora", "full", "freeze"):
        yield (f"added tokens (add_tokens / add_tokens_file) are trained and saved with finetuning_type "
               f"lora, full or freeze, not '{cfg.finetuning_type}'; remove them or change the method")
    if cfg.use_packing and cfg.finetuning_type in ("prompt_tuning", "prefix_tuning", "p_tuning"):
        yield (f"{cfg.finetuning_type} puts its virtual tokens before each row, so a packed row's later "
               "samples would not see them; turn packing off")
    if cfg.create_new_adapter and not cfg.adapter_name_or_path:
        yield "'create_new_adapter' needs 'adapter_name_or_path' (the adapters to merge first)"
    if cfg.prompt_tuning_init == "text" and not cfg.prompt_tuning_init_text:
        yield "prompt_tuning_init 'text' needs 'prompt_tuning_init_text'"
    if cfg.adalora_target_r > cfg.adalora_init_r:
        yield f"'adalora_target_r' ({cfg.adalora_target_r}) must not exceed 'adalora_init_r' ({cfg.adalora_init_r})"


def _expert_problems(cfg: RunConfig) -> Iterator[str]:
    ways = [k for k in ("expert_ids", "expert_domain", "expert_top_k") if getattr(cfg, k) is not None]
    if len(ways) > 1:
        yield f"choose experts one way: {' and '.join(ways)} are both set"
    if cfg.expert_domain and not cfg.expert_domain_map:
        yield "'expert_domain' needs 'expert_domain_map' (a JSON file of domain -> expert ids)"
    if cfg.train_router and not ways:
        yield ("'train_router' belongs to expert-selective tuning; also set expert_ids, expert_domain "
               "or expert_top_k")


def stage_owners(key: str) -> list[str]:
    """The stages STAGE_KEYS gives `key` to ([] for a key every stage reads)."""
    return [stage for stage, keys in STAGE_KEYS.items() if key in keys]


def stage_option_problems(cfg: RunConfig, source: str = "config") -> Iterator[str]:
    """A notice for each preference key set for a stage that ignores it; problems for contradictions."""
    for key in dict.fromkeys(k for keys in STAGE_KEYS.values() for k in keys):  # each key once, in order
        owners = stage_owners(key)
        if key in cfg.model_fields_set and cfg.stage not in owners and getattr(cfg, key) is not None:
            note(f"{source}: '{key}' applies to stage {' / '.join(owners)}, not '{cfg.stage}'; it has no effect")
    if cfg.stage == "grpo":
        yield from _grpo_problems(cfg)
    if cfg.dpo_label_smoothing > 0 and cfg.pref_loss != "sigmoid":
        yield (f"'dpo_label_smoothing' (cDPO) works with pref_loss sigmoid only, not '{cfg.pref_loss}'; "
               "set it to 0 or use pref_loss: sigmoid")


def _grpo_problems(cfg: RunConfig) -> Iterator[str]:
    if not cfg.reward_funcs:
        yield ("stage 'grpo' needs 'reward_funcs': e.g. [think_format, accuracy], a 'file.py:function', or a "
               "'stage: rm' output_dir")
    if cfg.per_device_train_batch_size % cfg.num_generations:
        yield (f"'per_device_train_batch_size' ({cfg.per_device_train_batch_size}) counts completions and must be a "
               f"multiple of 'num_generations' ({cfg.num_generations}), as in TRL; e.g. "
               f"{cfg.num_generations * max(1, cfg.per_device_train_batch_size // cfg.num_generations)}")
    if cfg.reward_weights is not None and cfg.reward_funcs and len(cfg.reward_weights) != len(cfg.reward_funcs):
        yield (f"'reward_weights' has {len(cfg.reward_weights)} weights for {len(cfg.reward_funcs)} reward_funcs; "
               "give one weight per reward function")


# --- what some keys parse into -------------------------------------------------------------------------
# Validation above needs these, and the code that acts on them (data.augment, models.unfreeze,
# train.optimizers) imports them from here, so the config depends on nothing above it.

# The `optim` names users know from HF / LLaMA-Factory -> the implementation train.optimizers builds.
OPTIMIZERS: dict[str, str] = {
    # canonical names are accepted too, so canonical_optim is idempotent
    "adamw": "adamw", "adamw_torch": "adamw", "adamw_torch_fused": "adamw_fused", "adamw_fused": "adamw_fused",
    "lion": "lion", "lion_32bit": "lion",
    "adamw_8bit": "adamw_8bit", "adamw_bnb_8bit": "adamw_8bit", "paged_adamw_8bit": "adamw_8bit",
    "lion_8bit": "lion_8bit", "paged_lion_8bit": "lion_8bit",
    "adafactor": "adafactor",
}


# augment_* keys, as data.augment.Augmenter takes them.
@dataclass
class AugmentOptions:
    synonym_prob: float = 0.0        # per eligible word/phrase: chance to replace it with a synonym
    insert_prob: float = 0.0         # per word: chance to insert a synonym of a random table word of the text after it
    shuffle_window: int = 0          # local shuffle: words (zh: clauses) move at most this many positions; 0 = off
    template_rotation: float = 0.0   # share of samples whose last user message is wrapped in an instruction template
    instruction_templates: list[str] | None = None   # templates with "{instruction}"; None: DEFAULT_TEMPLATES
    synonyms_file: str | None = None # user TSV table merged into the bundled ones
    back_translate: str | None = None  # "module.path:function", f(text: str, rng: random.Random) -> str
    augment_targets: bool = False
    ratio: float = 1.0               # share of samples augmented at all each epoch

    def enabled(self) -> bool:
        return self.ratio > 0 and (self.synonym_prob > 0 or self.insert_prob > 0 or self.shuffle_window > 0
                                   or self.template_rotation > 0 or bool(self.back_translate))


# unfreeze_schedule entries (models.unfreeze.Unfreezer applies them); GROUPS: module-name aliases.
GROUPS = {"mlp": "mlp", "ffn": "mlp", "self_attn": "self_attn", "attention": "self_attn", "attn": "self_attn"}


@dataclass(frozen=True)
class UnfreezeEntry:
    step: int | None
    epoch: float | None
    layers: int | None  # None: every layer
    modules: tuple[str, ...]  # () : every module

    def describe(self) -> str:
        where = "all layers" if self.layers is None else f"top {self.layers} layer{'s' * (self.layers != 1)}"
        return f"{', '.join(self.modules) or 'all modules'} of {where}"


def parse_schedule(entries: list) -> list[UnfreezeEntry]:
    """Config entries -> UnfreezeEntry list; ValueError naming the entry when one is malformed."""
    if not entries:
        raise ValueError("'unfreeze_schedule' is empty; give at least one {step: 0, layers: 1} entry")
    return [_parse_entry(i, e) for i, e in enumerate(entries)]


def _parse_entry(i: int, raw) -> UnfreezeEntry:
    where = f"unfreeze_schedule entry {i + 1}"
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a mapping like {{step: 0, layers: 2, modules: mlp}}")
    unknown = set(raw) - {"step", "epoch", "layers", "modules"}
    if unknown:
        raise ValueError(f"{where} has unknown key(s) {sorted(unknown)}; use step or epoch, layers, modules")
    if ("step" in raw) == ("epoch" in raw):
        raise ValueError(f"{where} needs exactly one of 'step' or 'epoch'")
    step, epoch = raw.get("step"), raw.get("epoch")
    if step is not None and (not isinstance(step, int) or step < 0):
        raise ValueError(f"{where}: 'step' must be a whole number >= 0")
    if epoch is not None and (not isinstance(epoch, (int, float)) or epoch < 0):
        raise ValueError(f"{where}: 'epoch' must be a number >= 0")
    layers = raw.get("layers", "all")
    if layers != "all" and (not isinstance(layers, int) or layers < 1):
        raise ValueError(f"{where}: 'layers' must be a count >= 1 (the top layers) or 'all'")
    modules = raw.get("modules", "all")
    if not isinstance(modules, str):
        raise ValueError(f"{where}: 'modules' must be 'all', 'mlp', 'self_attn' or comma-separated names")
    words = tuple(GROUPS.get(w.strip(), w.strip()) for w in modules.split(",") if w.strip() and w.strip() != "all")
    return UnfreezeEntry(step, None if epoch is None else float(epoch), None if layers == "all" else layers, words)


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run file, apply `key=value` overrides, validate; UserError on any problem."""
    path = Path(path)
    raw = _read_yaml(path)
    for item in overrides or []:
        key, value = _parse_override(item)
        raw[key] = value
    return validate_config(raw, source=str(path))


class Problem(NamedTuple):
    """One mistake in a run file: `line` for a list of several, `alone` when it is the only one."""
    key: Any  # the key it is about, to list problems in file order; None: several keys
    line: str
    alone: str


def _problem(source: str, line: str, key: Any = None) -> Problem:
    return Problem(key, line, f"{source}: {line}")


def validate_config(raw: dict[str, Any], source: str = "config") -> RunConfig:
    """The RunConfig of `raw`, or one UserError naming every problem: unknown keys, wrong types and values
    (pydantic reports all fields at once), and, when every field is valid, every cross-key contradiction."""
    order, raw = list(raw), dict(raw)
    problems = _screen_keys(raw, source)
    try:
        cfg = RunConfig.model_validate(raw, context={"source": source})
    except ValidationError as exc:
        problems += _validation_problems(exc, source)
    if problems:
        raise UserError(describe_problems(problems, source, order))
    cfg._source = source
    return cfg


def _screen_keys(raw: dict, source: str) -> list[Problem]:
    """Remove the keys RunConfig has no field for: a notice for those of NO_EFFECT_KEYS, a problem for the rest."""
    known, problems = set(RunConfig.model_fields), []
    for key in list(raw):
        if not isinstance(key, str):
            problems.append(_problem(source, f"key {key!r} is not a name; quote it or fix the line (see docs/config.md)", key))
        elif key in known:
            continue
        elif key in NO_EFFECT_KEYS:
            note(f"{source}: ignoring '{key}' ({NO_EFFECT_KEYS[key]})")
        else:
            hint = did_you_mean(key, known) or " — see docs/config.md for every key"
            problems.append(Problem(key, f"unknown key '{key}'{hint}", f"unknown key '{key}' in {source}{hint}"))
        raw.pop(key)
    return problems


def _validation_problems(exc: ValidationError, source: str) -> list[Problem]:
    """One problem per key pydantic rejected (its first error: a union reports one per member), then the
    cross-key problems ConfigProblems carries."""
    problems, seen = [], set()
    for err in exc.errors():
        key = str(err["loc"][0]) if err["loc"] else None
        if key is None:
            error = (err.get("ctx") or {}).get("error")
            messages = error.problems if isinstance(error, ConfigProblems) else [err["msg"].removeprefix("Value error, ")]
            problems += [_problem(source, m) for m in messages]
        elif key not in seen:
            seen.add(key)
            problems.append(_field_problem(err, source))
    return problems


def _field_problem(err: dict, source: str) -> Problem:
    key = ".".join(str(p) for p in err["loc"])
    if err["type"] == "missing":
        return _problem(source, _missing_line(key), str(err["loc"][0]))
    msg = err["msg"].removeprefix("Value error, ")
    return _problem(source, f"invalid value for '{key}': {msg} (got {err.get('input')!r})", str(err["loc"][0]))


def describe_problems(problems: list[Problem], source: str, order: list | None = None) -> str:
    """The message of one UserError: a single problem in its usual sentence, several as one line each,
    in the order of their keys in the file (`order`), contradictions between keys last."""
    if len(problems) == 1:
        return problems[0].alone
    place = {key: i for i, key in enumerate(order or [])}
    problems = sorted(problems, key=lambda p: place.get(p.key, len(place)))
    return f"{source}: {len(problems)} problems:\n" + "\n".join(f"  - {p.line}" for p in problems)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"config file '{path}' not found; pass the path of a YAML run file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; save the file as UTF-8") from None
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" line {line + 1}" if line is not None else ""
        raise UserError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)}); fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: the file must be a mapping of 'key: value' lines")
    return data


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise UserError(f"command-line override '{item}' must look like key=value")
    key, value = item.split("=", 1)
    if value == "":
        return key.strip(), None
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        return key.strip(), value  # not YAML: keep the text as given


def note(line: str) -> None:
    """A notice on stderr, from the main process only (every process of a multi-process run reads the config)."""
    if is_main():
        print(f"note: {line}", file=sys.stderr)


def missing_key_message(source: str, key: str) -> str:
    return f"{source}: {_missing_line(key)}"


def _missing_line(key: str) -> str:
    return f"required key '{key}' is missing; add it to the file"


def config_to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(), sort_keys=False, allow_unicode=True)


def config_docs_markdown() -> str:
    """docs/config.md: every key with its default and meaning, one table per section."""
    lines = [
        "# Run configuration keys",
        "",
        "Generated from `src/r1tune/config.py` by `python -m r1tune.config > docs/config.md`.",
        "Any key can be overridden on the command line: `r1tune train run.yaml lora_rank=16`.",
        "The run file is flat (every key at the top level, as in LLaMA-Factory); the sections below only group the keys.",
        "Unknown keys are errors, and a file with several mistakes gets them all listed, one line each. "
        "These keys from LLaMA-Factory are accepted and ignored with a notice: "
        + ", ".join(f"`{k}`" for k in sorted(NO_EFFECT_KEYS)) + ".",
        "Keys of one fine-tuning method or training stage set for another one get a notice that they have no effect "
        "(an error where they would change what is trained).",
    ]
    for name, cls in SECTIONS.items():
        lines += _section_docs(name, cls)
    return "\n".join(lines) + "\n"


def _section_docs(name: str, cls: type[BaseModel]) -> list[str]:
    lines = ["", f"## {name}", "", (cls.__doc__ or "").strip(), "", "| key | default | meaning |", "|---|---|---|"]
    for key, field in cls.model_fields.items():
        default = "required" if field.is_required() else f"`{field.default!r}`"
        lines.append(f"| `{key}` | {default} | {field.description} |")
    return lines

if __name__ == "__main__":
    sys.stdout.write(config_docs_markdown())
