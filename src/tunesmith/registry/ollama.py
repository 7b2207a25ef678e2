"""An Ollama Modelfile for an exported GGUF: the model's Jinja chat template restated in Ollama's Go-template
syntax, proven equal on sample conversations before it is written.

The Go template is built from pieces read off the Jinja template by rendering conversations of sentinel
strings: what each role's message is wrapped in, what starts the prompt, the generation prompt, and the
default system prompt the template injects when a conversation has none. Templates that are not "each
message wrapped the same way" (system text merged into the first user turn, turns numbered, roles dropped)
fail the equivalence check and raise instead of producing a Modelfile that prompts the model differently.
The sample contents have no leading/trailing whitespace, so a Jinja `| trim` on content is not detected.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from tunesmith.errors import TunesmithError

ROLES = ("system", "user", "assistant")
SENTINEL = {"system": "qqSYSTEMqq", "user": "qqUSERONEqq", "assistant": "qqASSISTANTONEqq",
            "user2": "qqUSERTWOqq", "assistant2": "qqASSISTANTTWOqq"}
# Conversations the Go template must reproduce exactly (contents are data: quotes, braces, newlines).
CHECK_CONVERSATIONS = (
    [{"role": "user", "content": "Hello there!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": 'Write {{ .Content }} and "quotes"\nover two lines.'}],
    [{"role": "system", "content": "You answer in JSON."}, {"role": "user", "content": "Name a color."},
     {"role": "assistant", "content": '{"color": "blue"}'}, {"role": "user", "content": "Another one, please."}],
    [{"role": "user", "content": "Start a story."}, {"role": "assistant", "content": "Once upon a time"}],
)


@dataclass
class ChatPieces:
    """What a per-message chat template is made of: `start` once, then each message as
    prefix[role] + content + suffix[role], then `generation` when the model is to answer."""

    start: str = ""
    prefix: dict[str, str] = field(default_factory=dict)
    suffix: dict[str, str] = field(default_factory=dict)
    generation: str = ""
    default_system: str | None = None


def ollama_modelfile(tokenizer, gguf_filename: str, stop_ids: list[int], system: str | None) -> str:
    """A Modelfile: FROM the GGUF beside it, the chat template as a Go TEMPLATE, a stop PARAMETER per end-of-turn
    token, and SYSTEM (the given one, else the template's default). Raises if the template cannot be expressed."""
    pieces = chat_pieces(tokenizer)
    system = system or pieces.default_system
    check_equivalence(tokenizer, pieces, system)
    lines = [f"FROM ./{gguf_filename}", "", f'TEMPLATE """{go_template(pieces)}"""', ""]
    for text in dict.fromkeys(tokenizer.decode([index]) for index in stop_ids):
        lines.append(f"PARAMETER stop {json.dumps(text, ensure_ascii=False)}")
    if system:
        if '"""' in system or system.endswith('"'):
            raise TunesmithError('the system prompt cannot end with " or contain """ in an Ollama Modelfile')
        lines += ["", f'SYSTEM """{system}"""']
    return "\n".join(lines) + "\n"


def chat_pieces(tokenizer) -> ChatPieces:
    """Read the pieces off the tokenizer's chat template by rendering sentinel conversations."""
    s, u1, a1, u2, a2 = (SENTINEL[key] for key in ("system", "user", "assistant", "user2", "assistant2"))
    full = _render(tokenizer, _conversation([("system", s), ("user", u1), ("assistant", a1), ("user", u2),
                                             ("assistant", a2)]))
    p0, p1, p2, p3, _, _ = _split(full, [s, u1, a1, u2, a2])
    user_suffix = _after(_render(tokenizer, _conversation([("system", s), ("user", u1)])), u1)
    assistant_suffix = _after(_render(tokenizer, _conversation([("system", s), ("user", u1), ("assistant", a1)])), a1)
    assistant_prefix = _strip_front(p2, user_suffix)
    user_prefix = _strip_front(p3, assistant_suffix)
    system_suffix = _strip_back(p1, user_prefix)
    with_system = _conversation([("system", s), ("user", u1)])
    generation = _strip_front(_render(tokenizer, with_system, generation=True), _render(tokenizer, with_system))
    pieces = ChatPieces(prefix={"user": user_prefix, "assistant": assistant_prefix},
                        suffix={"system": system_suffix, "user": user_suffix, "assistant": assistant_suffix},
                        generation=generation)
    head = _before(_render(tokenizer, _conversation([("user", u1)])), u1)  # no system message given
    start = _strip_back(head, user_prefix, strict=False)
    if start is not None and p0.startswith(start):
        pieces.start, pieces.prefix["system"] = start, p0[len(start):]
    elif head.startswith(p0) and head.endswith(p1) and len(head) > len(p0) + len(p1):
        # The template writes a default system prompt; Ollama then always has a system message (SYSTEM).
        pieces.prefix["system"], pieces.default_system = p0, head[len(p0):len(head) - len(p1)]
    else:
        raise _inexpressible("the text before the first message depends on whether there is a system message")
    return pieces


def go_template(pieces: ChatPieces) -> str:
    """The pieces as an Ollama Go template over .System and .Messages; a final assistant message is left open
    (Ollama continues it), otherwise the generation prompt follows the last message."""
    def body(role: str) -> str:
        text = _literal(pieces.prefix[role]) + "{{ .Content }}"
        if role == "assistant":
            return text + "{{ if not $last }}" + _literal(pieces.suffix[role]) + "{{ end }}"
        return text + _literal(pieces.suffix[role])

    return (
        _literal(pieces.start)
        + "{{ if .System }}" + _literal(pieces.prefix["system"]) + "{{ .System }}" + _literal(pieces.suffix["system"])
        + "{{ end }}{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
        + '{{ if eq .Role "user" }}' + body("user") + '{{ else if eq .Role "assistant" }}' + body("assistant")
        + '{{ end }}{{ if and $last (ne .Role "assistant") }}' + _literal(pieces.generation) + "{{ end }}{{ end }}"
    )


def render_like_ollama(pieces: ChatPieces, messages: list[dict]) -> str:
    """What Ollama makes of the Go template for these messages: system messages joined into .System, consecutive
    messages of one role merged (Ollama's collate), then the template's text."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    turns: list[dict] = []
    for message in (m for m in messages if m["role"] != "system"):
        if turns and turns[-1]["role"] == message["role"]:
            turns[-1] = {**turns[-1], "content": turns[-1]["content"] + "\n\n" + message["content"]}
        else:
            turns.append(dict(message))
    out = pieces.start
    if system:
        out += pieces.prefix["system"] + system + pieces.suffix["system"]
    for index, message in enumerate(turns):
        last = index == len(turns) - 1
        if message["role"] not in ("user", "assistant"):
            raise _inexpressible(f"role {message['role']!r} has no place in the template")
        out += pieces.prefix[message["role"]] + message["content"]
        if not (last and message["role"] == "assistant"):
            out += pieces.suffix[message["role"]]
        if last and message["role"] != "assistant":
            out += pieces.generation
    return out


def check_equivalence(tokenizer, pieces: ChatPieces, system: str | None) -> None:
    """Raise unless the Go template renders CHECK_CONVERSATIONS exactly as the Jinja template does, with the
    Modelfile's SYSTEM prepended (as Ollama does) when a conversation has no system message."""
    for conversation in CHECK_CONVERSATIONS:
        messages = list(conversation)
        if system and messages[0]["role"] != "system":
            ollama_side = [{"role": "system", "content": system}, *messages]
            jinja_side = messages if system == pieces.default_system else ollama_side
        else:
            ollama_side = jinja_side = messages
        continues = messages[-1]["role"] == "assistant"
        expected = _render(tokenizer, jinja_side, generation=not continues, continue_final=continues)
        if render_like_ollama(pieces, ollama_side) != expected:
            raise _inexpressible(f"it renders a {len(messages)}-message conversation differently")


def _render(tokenizer, messages, generation: bool = False, continue_final: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation,
                                             continue_final_message=continue_final)
    except Exception as exc:  # jinja raises anything the template author chose (TemplateError, ValueError...)
        first_line = str(exc).splitlines()[0] if str(exc) else repr(exc)
        raise _inexpressible(f"rendering a sample conversation failed ({first_line})") from None


def _conversation(turns) -> list[dict]:
    return [{"role": role, "content": content} for role, content in turns]


def _split(text: str, markers: list[str]) -> list[str]:
    """The text between consecutive markers (each must appear exactly once, in order)."""
    parts, rest = [], text
    for marker in markers:
        if text.count(marker) != 1 or marker not in rest:
            raise _inexpressible("message content does not appear exactly once, in order, in the rendered prompt")
        before, rest = rest.split(marker, 1)
        parts.append(before)
    return [*parts, rest]


def _after(text: str, marker: str) -> str:
    return _split(text, [marker])[1]


def _before(text: str, marker: str) -> str:
    return _split(text, [marker])[0]


def _strip_front(text: str, front: str) -> str:
    if not text.startswith(front):
        raise _inexpressible("a message's closing text changes with what follows it")
    return text[len(front):]


def _strip_back(text: str, back: str, strict: bool = True) -> str | None:
    if text.endswith(back):
        return text[:len(text) - len(back)]
    if strict:
        raise _inexpressible("a message's opening text changes with what precedes it")
    return None


def _literal(text: str) -> str:
    """Text for the Go template: as is, unless it holds `{{` or a quote (which could end the Modelfile's
    triple-quoted block); then as a Go string constant."""
    if "{{" in text or '"' in text:
        return "{{ " + json.dumps(text, ensure_ascii=False) + " }}"
    return text


def _inexpressible(reason: str) -> TunesmithError:
    return TunesmithError(f"the chat template cannot be expressed as an Ollama template: {reason}. "
                          "Export the GGUF without a Modelfile, or write its TEMPLATE by hand")
