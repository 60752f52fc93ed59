"""`r1tune` command line: one thin function per subcommand.

Every subcommand parses its arguments, loads the config, and calls one function.
A UserError becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from r1tune import __version__
from r1tune.errors import UserError

EXAMPLES = {
    "train": "example: r1tune train examples/quickstart.yaml learning_rate=1e-4 max_steps=50",
    "chat": "example: r1tune chat outputs/quickstart --prompt \"Is 4827 even or odd?\"\n"
            "example: r1tune chat examples/quickstart.yaml --prompt \"Is 4827 even or odd?\"",
    "export": "example: r1tune export examples/quickstart.yaml export_dir=outputs/quickstart-merged",
    "serve": "example: r1tune serve examples/quickstart.yaml --port 8000\n"
             "example: R1TUNE_API_KEY=secret r1tune serve examples/quickstart.yaml --host 0.0.0.0",
    "eval": "example: r1tune eval examples/quickstart.yaml\n"
            "example: r1tune eval examples/quickstart.yaml eval_thresholds='[\"accuracy >= 0.8\"]'",
    "tiny": "example: r1tune tiny models/tiny-deepseek --arch deepseek_v3",
    "env": "example: r1tune env",
    "data": "example: r1tune data check examples/quickstart.yaml\n"
            "example: r1tune data stats examples/quickstart.yaml\n"
            "example: r1tune data preview examples/quickstart.yaml -n 3 --json",
}


def cmd_train(args) -> int:
    from r1tune.config import load_config
    from r1tune.launch import launch, plan_from_env
    from r1tune.train import distributed
    from r1tune.train.stages.registry import run_stage

    plan = plan_from_env()
    if plan is not None:  # several processes asked for: this one only launches them
        load_config(args.config, args.overrides)  # a broken run file is reported once, before any worker starts
        return launch(plan, ["train", args.config, *args.overrides])
    cfg = load_config(args.config, args.overrides)
    distributed.setup(cfg.ddp_timeout, cfg.ddp_backend, group_of_one=bool(cfg.deepspeed))
    try:
        run_stage(cfg)
        distributed.barrier()  # every rank done (rank 0 saves last) before the group closes
    finally:
        distributed.teardown()
    return 0


def cmd_eval(args) -> int:
    from r1tune.config import load_config
    from r1tune.evaluation.run import run_eval

    return run_eval(load_config(args.config, args.overrides))


def cmd_export(args) -> int:
    from r1tune.config import load_config
    from r1tune.export.run import run_export

    return run_export(load_config(args.config, args.overrides))


def cmd_serve(args) -> int:
    from r1tune.config import load_config
    from r1tune.serve.server import serve

    cfg = load_config(args.config, args.overrides)
    serve(cfg, args.host, args.port, os.environ.get("R1TUNE_API_KEY"))
    return 0


def _data_setup(args):
    """Config and tokenizer (template applied) for the data subcommands."""
    from r1tune.config import load_config
    from r1tune.data.templates import apply_template_choice
    from r1tune.models.loading import ensure_tiny_model, load_tokenizer, resolve_model_path
    from r1tune.stages import stage_data
    from r1tune.train.stages.lifecycle import add_configured_tokens

    cfg = load_config(args.config, args.overrides)
    plot_default = args.action == "stats" and not args.plot  # the histogram then goes to output_dir
    cfg.require("dataset", *(["output_dir"] if plot_default else []),
                command=f"r1tune data {args.action}" + (" without --plot" if plot_default else ""))
    ensure_tiny_model(cfg.model_name_or_path, cfg.tiny_arch)
    tokenizer = load_tokenizer(resolve_model_path(cfg.model_name_or_path), cfg.trust_remote_code)
    apply_template_choice(tokenizer, cfg.template, args.config, needs_template=stage_data(cfg.stage).needs_template)
    add_configured_tokens(tokenizer, cfg)
    return cfg, tokenizer


def cmd_data(args) -> int:
    from r1tune.ui import console

    saved = getattr(console, "_file", None)  # None: follow sys.stdout as it is at each print
    if args.json:  # stdout carries only the JSON
        console.file = sys.stderr
    try:
        _run_data_action(args, console)
    finally:
        console.file = saved
    return 0


def _run_data_action(args, console) -> None:
    from r1tune.data import inspect
    from r1tune.data.prepare import prepare_data
    from r1tune.data.leakage import act_on_leakage
    from r1tune.ui import warn

    cfg, tokenizer = _data_setup(args)
    if args.action == "check":
        data = prepare_data(cfg, tokenizer, say=console.print)
        for line in data.report.lines():
            console.print(f"data: {line}")
        act_on_leakage(data.report.leakage, cfg.val_leakage, cfg.source, warn)
        console.print(f"ok: {len(data.train)} training and {len(data.val)} validation samples")
    elif args.action == "stats":
        stats = inspect.compute_stats(cfg, tokenizer)
        if args.json:
            inspect.print_json(stats.as_dict())
        else:
            inspect.print_stats(stats)
        plot = Path(args.plot or Path(cfg.output_dir) / "data_lengths.png")
        plot.parent.mkdir(parents=True, exist_ok=True)
        inspect.plot_lengths(stats.lengths, cfg.cutoff_len, plot)
        console.print(f"length histogram: {plot}", style="dim")
    else:
        rows = inspect.preview_rows(cfg, tokenizer, args.n)
        if args.json:
            inspect.print_json(rows)
        else:
            inspect.print_preview(rows, tokenizer, plain=args.plain or not console.is_terminal)


def cmd_chat(args) -> int:
    from r1tune.serve.chat import chat_loop, reply

    model, tokenizer = _chat_model(args)
    if args.prompt is not None:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        reply(model, tokenizer, messages + [{"role": "user", "content": args.prompt}], args.max_new_tokens, args.temperature)
        return 0
    chat_loop(model, tokenizer, args.system, args.max_new_tokens, args.temperature)
    return 0


def _chat_model(args):
    """A YAML config (a run file, or LLaMA-Factory's model + adapters + template), or a folder."""
    path = Path(args.dir)
    if path.suffix in (".yaml", ".yml") and not path.is_dir():
        from r1tune.config import load_config
        from r1tune.data.templates import apply_template_choice
        from r1tune.models.configured import load_configured

        cfg = load_config(path, args.overrides)
        loaded = load_configured(cfg)
        apply_template_choice(loaded.tokenizer, cfg.template, cfg.source, needs_template=True)
        return loaded.model, loaded.tokenizer
    if args.overrides:
        raise UserError(f"key=value overrides ('{args.overrides[0]}') need a YAML config, and '{args.dir}' is "
                        "not one; pass the config file or drop the overrides")
    from r1tune.models.run_loading import load_run

    return load_run(args.dir)


def cmd_tiny(args) -> int:
    from r1tune.models.tiny import build_tiny, check_hidden_size

    try:
        check_hidden_size(args.hidden_size)
    except ValueError as exc:
        raise UserError(f"--hidden-size: {exc}") from None
    out = build_tiny(args.out, args.arch, seed=args.seed, hidden_size=args.hidden_size, num_layers=args.layers)
    print(f"wrote tiny {args.arch} model and tokenizer to {out}")
    return 0


def cmd_env(args) -> int:
    from rich.markup import escape
    from rich.table import Table

    from r1tune.envinfo import collect
    from r1tune.ui import console

    table = Table(title=f"r1tune {__version__} environment")
    table.add_column("item")
    table.add_column("value")
    for key, value in collect():
        table.add_row(escape(key), escape(value))  # values hold brackets: r1tune[serve]
    console.print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="r1tune", description="Fine-tune DeepSeek-R1-family and other causal LMs from one YAML file.",
        epilog="Run 'r1tune COMMAND --help' for each command. Quickstart: r1tune train examples/quickstart.yaml")
    parser.add_argument("--version", action="version", version=f"r1tune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, help_text, func):
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=EXAMPLES[name],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func)
        return p

    def add_run(name, help_text, func, config_help="the YAML run file that trained the model (keys: docs/config.md)"):
        """A command that takes a run file and key=value overrides."""
        p = add(name, help_text, func)
        p.add_argument("config", help=config_help)
        p.add_argument("overrides", nargs="*", help="key=value overrides of config keys")
        return p

    add_run("train", "Fine-tune a model as described by a YAML run file (LoRA and its variants, QLoRA, AdaLoRA, "
                     "virtual tokens, bottleneck adapters, freeze, full, MoE expert selection).", cmd_train,
            "YAML run file (keys: docs/config.md)")
    add_run("eval", "Score the trained model (and the base) on held-out data: perplexity, BLEU-4, ROUGE-L, "
                    "exact match, accuracy, F1, robustness, multiple choice (a stage rm reward model: "
                    "rewards/accuracies, rewards/margins, each answer's score); exit 1 when a threshold fails.",
            cmd_eval)
    add_run("export", "Merge the trained adapter (or adapter_name_or_path's adapters) into its base and save a plain "
                      "transformers model (sharded safetensors, tokenizer, model card); exit 1 if its logits "
                      "differ from the unmerged model.", cmd_export,
            "the YAML run file that trained the model, or LLaMA-Factory's export YAML (keys: docs/config.md)")
    p = add_run("serve", "Serve the trained model over an OpenAI-compatible HTTP API (/v1/chat/completions with "
                         "reasoning_content, /v1/completions, /v1/models, /predict, /health, /metrics).", cmd_serve)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)

    p = add("chat", "Chat with a trained output dir (adapter or full model) or the model a YAML config names; "
                    "reasoning is shown apart from the answer.", cmd_chat)
    p.add_argument("dir", metavar="DIR_OR_CONFIG", help="an r1tune output_dir, any model folder, or a YAML config "
                   "(a run file, or LLaMA-Factory's model_name_or_path + adapter_name_or_path + template)")
    p.add_argument("overrides", nargs="*", help="with a YAML config: key=value overrides (before the options)")
    p.add_argument("--prompt", help="answer this one message and exit")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")

    p = add("tiny", "Build a small random model + DeepSeek-R1 tokenizer offline (seeded, seconds).", cmd_tiny)
    p.add_argument("out", help="folder to write")
    p.add_argument("--arch", choices=["deepseek_v3", "qwen2", "llama"], default="deepseek_v3")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden-size", type=int, default=256, help="a multiple of 64 (default 256)")
    p.add_argument("--layers", type=int, default=4)

    add("env", "Show versions (each marked tested or untested against constraints.txt), the CPU's matmul "
               "features (AVX2, AVX-512F, AVX-512 BF16, AMX) and what torch and bitsandbytes make of them, CUDA "
               "devices, and the qlora/serve/export extras with what needs each.", cmd_env)

    p = add("data", "Inspect a run's data: check it, report statistics, or preview rendered samples.", cmd_data)
    p.add_argument("action", choices=["check", "stats", "preview"],
                   help="check: read, template and tokenize every record and report counts; stats: quality report "
                        "(lengths, truncation, duplicates, labels, warnings) and a length histogram PNG; "
                        "preview: the first samples with trained tokens marked")
    p.add_argument("config", help="YAML run file")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.add_argument("-n", type=int, default=3, help="preview: how many records (default 3)")
    p.add_argument("--json", action="store_true", help="stats/preview: print JSON (token ids and labels for preview)")
    p.add_argument("--plain", action="store_true", help="preview: mark trained text with ⟦ ⟧ instead of colour")
    p.add_argument("--plot", help="stats: where to write the histogram (default OUTPUT_DIR/data_lengths.png)")
    return parser


def _quiet_libraries() -> None:
    import logging
    import warnings

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # CPU kernel notices on import

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _report_error(line: str, lost_peer: bool = False) -> None:
    """One line on stderr. A worker started by r1tune's launcher leaves it for the launcher instead, which
    prints the first failing rank's line once (r1tune.launch)."""
    from r1tune.launch import record_error
    from r1tune.process import rank

    if record_error(line, lost_peer):
        return
    prefix = f"rank {rank()}: " if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else ""
    print(prefix + line, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    from r1tune.train.memory import limit_onednn_cache

    limit_onednn_cache()  # before any bf16 matmul
    try:
        return args.func(args)
    except UserError as exc:
        _report_error(f"error: {exc}")
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        from r1tune.train.distributed import lost_peer

        if not lost_peer(exc):
            raise  # a bug: the traceback is what helps
        _report_error(f"stopped: another process of the job ended first ({str(exc).splitlines()[0][:200]})", True)
        return 1
