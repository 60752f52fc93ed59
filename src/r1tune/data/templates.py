"""Chat templates: compact Jinja templates written for r1tune, and the name registry.

Each template renders plain system/user/assistant conversations exactly as the
model family's official template does (tests/test_templates.py checks text and
token ids against the official Jinja, kept in tests/fixtures/official_templates/).
Tools, tool calls and template variables such as dates are not supported.

Every template renders a conversation's earlier turns as a growing prefix and an
assistant message as header + content + suffix, which is what r1tune's encoder
(`r1tune.data.encode`) relies on. Special tokens of another model family (chatml's
`<|im_start|>`, llama3's `<|start_header_id|>`) are written as literal text: with a
tokenizer that lacks them they are just text. `bos_token`/`eos_token` are used where
the official template uses them, so they follow the tokenizer the template is set on.

The templates:

- `deepseek_r1`: DeepSeek-R1. BOS, the system prompts joined raw (several are joined
  with a blank line), `<｜User｜>…`, `<｜Assistant｜>…<｜end▁of▁sentence｜>` with everything
  up to `</think>` removed from every assistant message, and a generation prompt that
  opens the reasoning block (`<｜Assistant｜><think>\\n`), as the current official
  template does.
- `deepseek_r1_nothink`: the same with reasoning switched off: the generation prompt
  closes an empty reasoning block (`<｜Assistant｜><think>\\n\\n</think>\\n\\n`), the way
  R1 answers when it skips thinking and how R1-0528 / V3.1-style "non-thinking" modes
  are prompted (V3.1 itself writes a bare `</think>` instead). Training targets after it
  are plain answers.
- `deepseek_v3`: DeepSeek-V3. As R1 but assistant messages are kept verbatim (the V3
  template strips no reasoning) and the generation prompt is a bare `<｜Assistant｜>`.
- `qwen`: Qwen2.5-Instruct (chatml) with its default system prompt when the
  conversation has none; a first system message, even empty, replaces it.
- `chatml`: plain chatml, no default system prompt.
- `llama3`: Meta-Llama-3-8B-Instruct (Llama 3.0) exactly: BOS before the first
  message, `<|start_header_id|>role<|end_header_id|>\\n\\n` + content stripped of
  surrounding whitespace + `<|eot_id|>`. Llama 3.1+ templates differ: they always
  write a system block starting "Cutting Knowledge Date: December 2023\\nToday Date: …",
  so `llama3` does not match them.
- `alpaca`: LLaMA-Factory's `alpaca` template as its trainer renders it: the system
  text (LLaMA-Factory's default below when the conversation has none or an empty one)
  written verbatim, then `### Instruction:\\n{user}\\n\\n### Response:\\n` and
  `{assistant}<eos>\\n\\n` per exchange. A custom system prompt is not followed by a
  separator, as in LLaMA-Factory, so end it with a blank line. The user turn already
  ends with `### Response:\\n`, so the generation prompt adds nothing.
- `auto`: keep the tokenizer's own template.
"""

from __future__ import annotations

from r1tune.errors import UserError, did_you_mean

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

ALPACA_DEFAULT_SYSTEM = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
)
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


def _deepseek(strip_reasoning: bool, generation_prompt: str) -> str:
    """DeepSeek's layout; `generation_prompt` is Jinja string-literal text."""
    strip = (
        "{%- if '</think>' in content -%}{%- set content = content.split('</think>')[-1] -%}{%- endif -%}"
        if strip_reasoning else ""
    )
    return (
        "{%- set ns = namespace(system='', first=true) -%}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'system' -%}"
        "{%- if ns.first -%}{%- set ns.system = message['content'] -%}{%- set ns.first = false -%}"
        "{%- else -%}{%- set ns.system = ns.system + '\\n\\n' + message['content'] -%}{%- endif -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{{- bos_token + ns.system -}}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}"
        "{{- '<｜User｜>' + message['content'] -}}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{%- set content = message['content'] -%}"
        + strip +
        "{{- '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '" + generation_prompt + "' -}}{%- endif -%}"
    )


DEEPSEEK_R1_TEMPLATE = _deepseek(True, "<｜Assistant｜><think>\\n")
DEEPSEEK_R1_NOTHINK_TEMPLATE = _deepseek(True, "<｜Assistant｜><think>\\n\\n</think>\\n\\n")
DEEPSEEK_V3_TEMPLATE = _deepseek(False, "<｜Assistant｜>")

_CHATML_TURNS = (
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
)
_CHATML_GENERATION = "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"

CHATML_TEMPLATE = "{%- for message in messages -%}" + _CHATML_TURNS + "{%- endfor -%}" + _CHATML_GENERATION

QWEN_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>system\\n" + QWEN_DEFAULT_SYSTEM + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if not (loop.first and message['role'] == 'system') -%}" + _CHATML_TURNS + "{%- endif -%}"
    "{%- endfor -%}"
    + _CHATML_GENERATION
)

LLAMA3_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first -%}{{- bos_token -}}{%- endif -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)

ALPACA_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' and messages[0]['content'] -%}"
    "{{- messages[0]['content'] -}}"
    "{%- else -%}"
    "{{- '" + ALPACA_DEFAULT_SYSTEM.replace("\n", "\\n") + "' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- '### Instruction:\\n' + message['content'] + '\\n\\n### Response:\\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- message['content'] + eos_token + '\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# name -> Jinja source; None means "the tokenizer's own template".
TEMPLATES: dict[str, str | None] = {
    "auto": None,
    "deepseek_r1": DEEPSEEK_R1_TEMPLATE,
    "deepseek_r1_nothink": DEEPSEEK_R1_NOTHINK_TEMPLATE,
    "deepseek_v3": DEEPSEEK_V3_TEMPLATE,
    "qwen": QWEN_TEMPLATE,
    "chatml": CHATML_TEMPLATE,
    "llama3": LLAMA3_TEMPLATE,
    "alpaca": ALPACA_TEMPLATE,
}
# LLaMA-Factory's names for the same templates (its `qwen`, `llama3` and `alpaca`
# are registry names already).
ALIASES = {"deepseekr1": "deepseek_r1", "deepseek3": "deepseek_v3", "default": "auto",
           "qwen3_nothink": "chatml"}  # LLaMA-Factory's Qwen3 template without reasoning is plain ChatML


def template_names() -> list[str]:
    """Every name `template:` accepts: registry names and aliases, sorted."""
    return sorted(set(TEMPLATES) | set(ALIASES))


def resolve_template(name: str, source: str = "config") -> str | None:
    """The Jinja source for a template name (None = keep the tokenizer's), or UserError."""
    key = ALIASES.get(name, name)
    if key not in TEMPLATES:
        choices = template_names()
        # Suggest a registry name before an alias ('deepseek-r1' -> 'deepseek_r1', not 'deepseekr1').
        hint = did_you_mean(str(name), TEMPLATES) or did_you_mean(str(name), choices)
        raise UserError(f"{source}: unknown template '{name}'{hint}; choose one of {', '.join(choices)}")
    return TEMPLATES[key]


def apply_template_choice(tokenizer, name: str, source: str = "config", needs_template: bool = True) -> None:
    """Set the tokenizer's chat template from the config, checking one exists when chats are rendered."""
    jinja = resolve_template(name, source)
    if jinja is not None:
        tokenizer.chat_template = jinja
    if needs_template and not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"{source}: the tokenizer has no chat template; set 'template: deepseek_r1' (or another registered template)")
