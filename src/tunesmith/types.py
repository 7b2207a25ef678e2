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


class PreferenceExample(BaseModel):
    """A paired preference: the conversation so far, then a preferred and a dispreferred assistant reply.

    Run-directory contract: when `manifest["data"]["kind"] == "preference"`, `data/{train,validation}.jsonl`
    hold one of these per line (`messages` are the prompt turns, ending with a user turn).
    """

    model_config = ConfigDict(extra="forbid")
    messages: list[ChatMessage]
    chosen: str
    rejected: str
    source_line: int | None = None


class UnpairedPreferenceExample(BaseModel):
    """One reply labelled desirable (True) or not (False), for KTO-style training.

    Run-directory contract: `manifest["data"]["kind"] == "unpaired_preference"`.
    """

    model_config = ConfigDict(extra="forbid")
    messages: list[ChatMessage]
    completion: str
    label: bool
    source_line: int | None = None
