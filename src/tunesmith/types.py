"""Shared records passed between stages: stdlib + pydantic only."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

Role = Literal["system", "user", "assistant"]


class ChatMessage(BaseModel):
    """One turn of a conversation."""

    model_config = ConfigDict(extra="forbid")
    role: Role
    content: str


class ChatExample(BaseModel):
    """A training/evaluation example in the canonical chat form every input format is turned into."""

    model_config = ConfigDict(extra="forbid")
    messages: list[ChatMessage]
    source_line: int | None = None

    def prompt_messages(self) -> list[dict]:
        """Every turn before the final assistant turn, as plain dicts for a chat template."""
        return [m.model_dump() for m in self.messages[:-1]]

    def reference(self) -> str:
        """The final assistant turn: what the model is expected to produce."""
        return self.messages[-1].content
