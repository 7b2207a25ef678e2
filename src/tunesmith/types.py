"""Shared records passed between stages: stdlib + pydantic only."""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict

Role = Literal["system", "user", "assistant", "tool"]


class ChatMessage(BaseModel):
    """One turn of a conversation (the OpenAI chat fine-tuning format, tool calls included)."""

    model_config = ConfigDict(extra="forbid")
    role: Role
    content: str
    name: str | None = None
    """The speaker's name (OpenAI `name`), passed to the chat template."""
    weight: Literal[0, 1] | None = None
    """On assistant turns: 0 keeps the turn as context without training on it."""
    tool_calls: list[dict] | None = None
    """On assistant turns: OpenAI `tool_calls` ({id, type: function, function: {name, arguments}})."""
    tool_call_id: str | None = None
    """On tool turns: the id of the call this result answers."""

    def as_dict(self) -> dict:
        """The message as a plain dict with only the fields that are set (what chat templates expect)."""
        return self.model_dump(exclude_none=True)


class ChatExample(BaseModel):
    """A training/evaluation example in the canonical chat form every input format is turned into."""

    model_config = ConfigDict(extra="forbid")
    messages: list[ChatMessage]
    tools: list[dict] | None = None
    """OpenAI function definitions offered in this conversation; passed to the chat template."""
    source_line: int | None = None

    def message_dicts(self) -> list[dict]:
        """Every turn as a plain dict, for a chat template."""
        return [m.as_dict() for m in self.messages]

    def prompt_messages(self) -> list[dict]:
        """Every turn before the final assistant turn, as plain dicts for a chat template."""
        return self.message_dicts()[:-1]

    def reference(self) -> str:
        """The final assistant turn: what the model is expected to produce (its tool calls as JSON, if any)."""
        last = self.messages[-1]
        if last.tool_calls and not last.content:
            return json.dumps([call.get("function", call) for call in last.tool_calls], ensure_ascii=False)
        return last.content


class PreferenceExample(BaseModel):
    """A paired preference: the conversation so far, then a preferred and a dispreferred assistant reply.

    Run-directory contract: when `manifest["data"]["kind"] == "preference"`, `data/{train,validation}.jsonl`
    hold one of these per line (`messages` are the prompt turns, ending with a user turn).
    """

    model_config = ConfigDict(extra="forbid")
    messages: list[ChatMessage]
    chosen: str
    rejected: str
    rejected_cut: bool | None = None
    """True: the rejected reply stops right after its mistake (`data mine-pairs`): DPO lowers the mistake itself, not an
    end of turn after it, so no end-of-turn token follows it in training. None otherwise (never False), so a pair
    without it is stored and hashed exactly as before the field existed (same split, same data hash)."""
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
