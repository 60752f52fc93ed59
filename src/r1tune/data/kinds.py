"""One record of any supported kind -> a Sample.

Kinds: `chat` (alpaca / ShareGPT / OpenAI messages), `text` (pretraining), `preference`
(chosen/rejected, alpaca or conversation form, LLaMA-Factory `ranking`), `kto` (a chat
with a boolean desirability label, column `kto_tag`), `cls` (`text` + `label`; trained
as a chat whose answer is the label, so the balanced sampler can even out the labels) and `prompt`
(GRPO: a conversation up to the user's last message; the record's other fields ride along for the
reward functions).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from r1tune.data.formats import (ALPACA_COLUMNS, Conversation, FormatSpec, check_roles, text_field,
                                 to_conversation)
from r1tune.errors import UserError

KINDS = ("chat", "text", "preference", "kto", "cls", "prompt")
# What a reward function is called with besides a prompt record's own fields (TRL's names, and r1tune's prompt_texts).
RESERVED = ("prompts", "completions", "completion_ids", "trainer_state", "prompt_texts")


@dataclass
class Sample:
    kind: str
    where: str
    messages: Conversation = field(default_factory=list)  # chat/kto/cls: ends with the answer; preference: the prompt
    text: str = ""  # text kind
    chosen: str = ""  # preference answers
    rejected: str = ""
    label: str | None = None  # cls label; kto "true"/"false"
    tools: list | None = None
    columns: dict | None = None  # prompt kind: the record's other fields (e.g. `answer`), for reward functions
    conversational: bool = False  # prompt kind: given as messages (TRL then hands reward functions messages)


def detect_kind(record: dict, spec: FormatSpec) -> str:
    cols = spec.columns
    if spec.ranking or (cols.get("chosen", "chosen") in record and cols.get("rejected", "rejected") in record):
        return "preference"
    if cols.get("kto_tag", "kto_tag") in record:
        return "kto"
    text_col, label_col = cols.get("text", "text"), cols.get("label", "label")
    if text_col in record and label_col in record:
        return "cls"
    if text_col in record and not _has_chat_fields(record, spec):
        return "text"
    return "chat"


def _has_chat_fields(record: dict, spec: FormatSpec) -> bool:
    names = {spec.columns.get("prompt", "instruction"), spec.columns.get("messages", "messages"), "conversations"}
    return any(name in record for name in names)


def to_sample(record: dict, spec: FormatSpec, where: str, kind: str | None = None) -> Sample:
    """The record as a Sample of `kind` (None: the kind its fields show)."""
    kind = kind or detect_kind(record, spec)
    if kind == "preference":
        return _preference(record, spec, where)
    if kind == "text":
        return Sample("text", where, text=text_field(record, spec.columns.get("text", "text"), where, required=True))
    if kind == "cls":
        return _classification(record, spec, where)
    if kind == "prompt":
        return _prompt(record, spec, where)
    messages = to_conversation(record, spec, where)
    tools = _tools(record, spec, where)
    if kind == "kto":
        column = spec.columns.get("kto_tag", "kto_tag")
        flag = record.get(column)
        if not isinstance(flag, bool):
            raise UserError(f"{where}: field '{column}' must be true or false (is the answer desirable?), got {flag!r}")
        return Sample("kto", where, messages, label=str(flag).lower(), tools=tools)
    return Sample("chat", where, messages, tools=tools)


def pretraining_text(record: dict, spec: FormatSpec, where: str) -> Sample:
    """For stage pt: the record's text (LLaMA-Factory maps it with columns.prompt; .txt lines are 'text')."""
    column = spec.columns.get("prompt") or spec.columns.get("text") or "text"
    if column not in record and "text" in record:
        column = "text"
    if column not in record:
        raise UserError(f"{where}: field '{column}' is missing; pretraining records need a text field "
                        "('text', or the column named by columns.prompt in dataset_info.json)")
    return Sample("text", where, text=text_field(record, column, where, required=True))


def _classification(record: dict, spec: FormatSpec, where: str) -> Sample:
    text_col, label_col = spec.columns.get("text", "text"), spec.columns.get("label", "label")
    text = text_field(record, text_col, where, required=True)
    label = record.get(label_col)
    if isinstance(label, bool) or not isinstance(label, (str, int)) or str(label).strip() == "":
        raise UserError(f"{where}: field '{label_col}' must be a non-empty string or integer class label, got {label!r}")
    label = str(label).strip()
    messages = [{"role": "user", "content": text}, {"role": "assistant", "content": label}]
    return Sample("cls", where, messages, label=label)


def _preference(record: dict, spec: FormatSpec, where: str) -> Sample:
    cols = {**ALPACA_COLUMNS, "chosen": "chosen", "rejected": "rejected", **spec.columns}
    answers = [_answer(record.get(cols[key]), cols[key], spec, where) for key in ("chosen", "rejected")]
    if all(isinstance(a, list) for a in answers):  # full conversations sharing a prompt (TRL style)
        prompt = _shared_prompt(answers[0], answers[1], where)
        chosen, rejected = answers[0][-1]["content"], answers[1][-1]["content"]
    else:
        stub = dict(record)
        stub[cols["response"]] = "-"  # parse the prompt part with the chat/alpaca reader
        if spec.formatting in ("sharegpt", "openai") or _has_messages(record, spec):
            prompt = _prompt_messages(record, spec, where)
        else:
            prompt = to_conversation(stub, FormatSpec("alpaca", spec.columns, spec.tags), where)[:-1]
        chosen, rejected = answers
    if chosen == rejected:
        raise UserError(f"{where}: fields '{cols['chosen']}' and '{cols['rejected']}' are identical; a preference pair needs two different answers")
    return Sample("preference", where, prompt, chosen=chosen, rejected=rejected, tools=_tools(record, spec, where))


def _prompt(record: dict, spec: FormatSpec, where: str) -> Sample:
    """A GRPO prompt: alpaca (instruction/input, any output ignored), ShareGPT / OpenAI messages (a
    final assistant message dropped), or TRL's `prompt` column (text, or a list of messages)."""
    cols = {**ALPACA_COLUMNS, **spec.columns}
    used = {cols[k] for k in ("prompt", "query", "system", "history")} | {spec.columns.get("tools", "tools")}
    if "prompt" in record and "prompt" not in spec.columns and cols["prompt"] not in record:  # TRL style
        value, used = record["prompt"], used | {"prompt"}
        if isinstance(value, str) and value.strip():
            messages, conversational = [{"role": "user", "content": value}], False
        elif isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
            messages, conversational = _prompt_turns({"messages": value}, FormatSpec("auto"), where), True
        else:
            raise UserError(f"{where}: field 'prompt' must be text or a list of messages, got {type(value).__name__}")
    elif _has_messages(record, spec):
        col = spec.columns.get("messages") or ("messages" if "messages" in record else "conversations")
        messages, conversational, used = _prompt_turns(record, spec, where), True, used | {col}
    else:
        stub = {**record, cols["response"]: "-"}
        messages, conversational = to_conversation(stub, FormatSpec("alpaca", spec.columns, spec.tags), where)[:-1], False
    columns = {k: v for k, v in record.items() if k not in used and k not in RESERVED}
    return Sample("prompt", where, messages, tools=_tools(record, spec, where), columns=columns,
                  conversational=conversational)


def _prompt_turns(record: dict, spec: FormatSpec, where: str) -> Conversation:
    """A message list as a prompt: it ends with the user, or its final assistant message is dropped."""
    try:
        return _prompt_messages(record, spec, where)
    except UserError:
        whole = to_conversation(record, spec, where)  # raises the record's real problem, if any
        return whole[:-1]


def _answer(value, column: str, spec: FormatSpec, where: str):
    """A preference answer: a string, a message object ({from/role, value/content}) or a message list."""
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, dict):
        content = value.get(spec.tags.get("content_tag", "value"), value.get("content"))
        if isinstance(content, str) and content.strip():
            return content
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        conv = to_conversation({"messages": value}, FormatSpec("auto"), f"{where} field '{column}'")
        return conv
    state = "missing" if value is None else f"not an answer ({type(value).__name__})"
    raise UserError(f"{where}: field '{column}' is {state}; give the answer as text or as a message object")


def _shared_prompt(chosen: Conversation, rejected: Conversation, where: str) -> Conversation:
    if chosen[:-1] != rejected[:-1]:
        raise UserError(f"{where}: fields 'chosen' and 'rejected' must share every message but the last one")
    return chosen[:-1]


def _has_messages(record: dict, spec: FormatSpec) -> bool:
    return spec.columns.get("messages", "conversations") in record or "messages" in record


def _prompt_messages(record: dict, spec: FormatSpec, where: str) -> Conversation:
    """The conversation of a ShareGPT/OpenAI preference record, which ends with the user."""
    stub = dict(record)
    col = spec.columns.get("messages") or ("messages" if "messages" in record else "conversations")
    turns = record.get(col)
    if not isinstance(turns, list) or not turns:
        raise UserError(f"{where}: field '{col}' must list the prompt's messages")
    fmt = spec.formatting if spec.formatting != "auto" else ("sharegpt" if "from" in turns[0] else "openai")
    tags = spec.tags
    assistant = tags.get("assistant_tag", "gpt" if fmt == "sharegpt" else "assistant")
    role_tag, content_tag = tags.get("role_tag", "from" if fmt == "sharegpt" else "role"), tags.get("content_tag", "value" if fmt == "sharegpt" else "content")
    stub[col] = list(turns) + [{role_tag: assistant, content_tag: "-"}]
    messages = to_conversation(stub, FormatSpec(fmt, spec.columns, spec.tags), where)[:-1]
    check_roles(messages + [{"role": "assistant", "content": "-"}], where)
    return messages


def _tools(record: dict, spec: FormatSpec, where: str) -> list | None:
    """LLaMA-Factory's `tools` column: a JSON string (or list) of function schemas."""
    import json

    column = spec.columns.get("tools", "tools")
    value = record.get(column)
    if value in (None, "", []):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}: field '{column}' is not valid JSON ({exc.msg}); give a list of function schemas") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise UserError(f"{where}: field '{column}' must be a list of function schema objects")
    return value
