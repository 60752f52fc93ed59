"""Chat templates: the DeepSeek-R1 Jinja template and the name registry.

The R1 template below renders exactly what the official DeepSeek-R1 template
renders for system/user/assistant conversations: BOS, the system prompts joined
raw, `<｜User｜>…`, `<｜Assistant｜>…<｜end▁of▁sentence｜>` with everything up to
`</think>` removed from every assistant message, and a generation prompt that
opens the reasoning block (`<｜Assistant｜><think>\\n`).
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

DEEPSEEK_R1_TEMPLATE = (
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
    "{%- if '</think>' in content -%}{%- set content = content.split('</think>')[-1] -%}{%- endif -%}"
    "{{- '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<｜Assistant｜><think>\\n' -}}{%- endif -%}"
)

# name -> Jinja source; None means "the tokenizer's own template".
TEMPLATES: dict[str, str | None] = {
    "auto": None,
    "deepseek_r1": DEEPSEEK_R1_TEMPLATE,
}
# LLaMA-Factory's names for the same templates.
ALIASES = {"deepseekr1": "deepseek_r1", "default": "auto"}


def resolve_template(name: str, source: str = "config") -> str | None:
    """The Jinja source for a template name (None = keep the tokenizer's), or UserError."""
    key = ALIASES.get(name, name)
    if key not in TEMPLATES:
        choices = sorted(set(TEMPLATES) | set(ALIASES))
        raise UserError(
            f"{source}: unknown template '{name}'{did_you_mean(name, choices)}; choose one of {', '.join(choices)}")
    return TEMPLATES[key]


def apply_template_choice(tokenizer, name: str, source: str = "config") -> None:
    """Set the tokenizer's chat template from the config, checking one exists."""
    jinja = resolve_template(name, source)
    if jinja is not None:
        tokenizer.chat_template = jinja
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"{source}: the tokenizer has no chat template; set 'template: deepseek_r1' (or another registered template)")
