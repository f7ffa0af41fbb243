"""Chat records in the common SFT schemas -> one normalized list of messages.

Accepted record shapes (one JSON object per line)::

    OpenAI     {"messages": [{"role": "system|user|assistant|tool", "content": "..."}, ...]}
    ShareGPT   {"conversations": [{"from": "system|human|gpt|tool", "value": "..."}, ...]}
    Alpaca     {"instruction": "...", "input": "...", "output": "...", ["system": "..."]}

Everything becomes ``[Message(role, content), ...]`` with roles ``system``, ``user``,
``assistant`` and ``tool``. Problems raise :class:`RecordError` carrying a short, stable
``reason`` (used to count rejects in the summary) and a human message.
"""

from __future__ import annotations

from typing import Optional

from megatron_pack.templates.messages import Message, RecordError

ROLES = ("system", "user", "assistant", "tool")

# Role spellings seen in public SFT sets, mapped onto the four roles above.
ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "prompter": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "bot": "assistant",
    "tool": "tool",
    "ipython": "tool",
    "function": "tool",
    "observation": "tool",
}


#: OpenAI message keys passed through to Jinja chat templates besides role and content.
EXTRA_KEYS = ("tool_calls", "tool_call_id", "name")


def _content_text(content, where: str, allow_empty: bool = False) -> str:
    """Message content as one string; OpenAI list-of-parts content keeps its text parts."""
    if isinstance(content, list):
        # {"type": "text", "text": ...} parts; anything else (images, audio) is not text SFT.
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise RecordError("non_string_content", f"{where}: content part is not a text part: {str(part)[:80]}")
            texts.append(part["text"])
        content = "".join(texts)
    if content is None and allow_empty:
        return ""
    if content is None:
        raise RecordError("empty_content", f"{where}: content is missing or null")
    if not isinstance(content, str):
        raise RecordError("non_string_content", f"{where}: content is {type(content).__name__}, expected a string")
    if not content.strip() and not allow_empty:
        raise RecordError("empty_content", f"{where}: content is empty")
    return content


def _role(value, where: str) -> str:
    if value is None:
        raise RecordError("missing_role", f"{where}: no role")
    if not isinstance(value, str):
        raise RecordError("unknown_role", f"{where}: role is {type(value).__name__}, expected a string")
    role = ROLE_ALIASES.get(value.strip().lower())
    if role is None:
        raise RecordError("unknown_role", f"{where}: unknown role {value!r} (known: {', '.join(sorted(ROLE_ALIASES))})")
    return role


def _from_turns(turns, role_key: str, content_key: str, field: str) -> list[Message]:
    if not isinstance(turns, list):
        raise RecordError("unknown_schema", f"'{field}' is {type(turns).__name__}, expected a list")
    messages = []
    for i, turn in enumerate(turns):
        where = f"{field}[{i}]"
        if not isinstance(turn, dict):
            raise RecordError("unknown_schema", f"{where} is {type(turn).__name__}, expected an object")
        role = _role(turn.get(role_key), where)
        extra = ({k: turn[k] for k in EXTRA_KEYS if turn.get(k) is not None} or None) if len(turn) > 2 else None
        # transformers renders an empty system prompt and a tool-call turn without text.
        allow_empty = role == "system" or bool(extra and extra.get("tool_calls"))
        messages.append(Message(role, _content_text(turn.get(content_key), where, allow_empty), extra))
    return messages


def _from_alpaca(record: dict) -> list[Message]:
    instruction = _content_text(record.get("instruction"), "instruction")
    extra = record.get("input")
    if extra is not None and not isinstance(extra, str):
        raise RecordError("non_string_content", f"input is {type(extra).__name__}, expected a string")
    prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    messages = []
    if record.get("system"):
        messages.append(Message("system", _content_text(record["system"], "system")))
    messages.append(Message("user", prompt))
    messages.append(Message("assistant", _content_text(record.get("output"), "output")))
    return messages


def detect_schema(record) -> str:
    """'openai', 'sharegpt' or 'alpaca'; raises RecordError for anything else."""
    if not isinstance(record, dict):
        raise RecordError("unknown_schema", f"record is {type(record).__name__}, expected a JSON object")
    if "messages" in record:
        return "openai"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record or "output" in record:
        return "alpaca"
    keys = ", ".join(sorted(record)[:8])
    raise RecordError(
        "unknown_schema",
        f"no 'messages', 'conversations' or 'instruction'/'output' key (keys: {keys})",
    )


def record_tools(record) -> Optional[list]:
    """The record's ``tools`` (OpenAI function schemas) for templates that render them."""
    tools = record.get("tools") if isinstance(record, dict) else None
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RecordError("unknown_schema", "'tools' must be a list of objects")
    return tools


def normalize_record(record) -> tuple[str, list[Message]]:
    """(schema name, messages) for one parsed JSON record, validated.

    Checks shared by every template: known roles, string content (empty only for a system
    prompt or a tool-call turn), at least one message (else ``empty``) and at least one assistant
    turn (else ``no_assistant_turn``). Anything a template cannot
    render (a system message late, strict alternation) is for the template to refuse.
    Template-specific rules (alternation, tool support) live in the templates.
    """
    schema = detect_schema(record)
    if schema == "openai":
        messages = _from_turns(record["messages"], "role", "content", "messages")
    elif schema == "sharegpt":
        messages = _from_turns(record["conversations"], "from", "value", "conversations")
        # Some ShareGPT exports put the system prompt beside the turns.
        if isinstance(record.get("system"), str) and record["system"].strip():
            messages.insert(0, Message("system", record["system"]))
    else:
        messages = _from_alpaca(record)
    if not messages:
        field = "messages" if schema == "openai" else "conversations"
        raise RecordError("empty", f"'{field}' is an empty list: nothing to train on")
    if not any(m.role == "assistant" for m in messages):
        raise RecordError("no_assistant_turn", "conversation has no assistant turn")
    return schema, messages
