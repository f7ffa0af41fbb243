"""What a chat template renders and how it refuses: :class:`Message` (role, text, and the
OpenAI tool fields a Jinja template may read) and :class:`RecordError` (a stable ``reason`` for
counting rejects). Records become messages in :mod:`megatron_pack.preprocess.schema`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True, eq=False)
class Message:
    role: str
    content: str
    extra: Optional[dict] = None
    """tool_calls / tool_call_id / name, as given (Jinja templates only)."""

    def as_dict(self) -> dict:
        """The message as transformers hands it to a chat template."""
        return {"role": self.role, "content": self.content, **(self.extra or {})}

    def __eq__(self, other):
        return isinstance(other, Message) and (self.role, self.content, self.extra or None) == (
            other.role, other.content, other.extra or None)

    def __hash__(self):
        return hash((self.role, self.content))


class RecordError(ValueError):
    """A record that cannot be used; ``reason`` is a stable key for counting."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.detail = message
