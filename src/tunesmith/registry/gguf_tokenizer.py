"""The tokenizer half of a GGUF file: a byte-level BPE vocabulary, its merges, special ids and chat template,
under llama.cpp's metadata keys."""

from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path

from tunesmith.errors import TunesmithError

# llama.cpp names a BPE pre-tokenizer by hashing the ids its tokenizer gives this text
# (convert_hf_to_gguf.py, get_vocab_base_pre); a few hashes of models people fine-tune here.
LLAMA_CPP_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
PRE_TOKENIZER_BY_HASH = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / Qwen2 / Qwen2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3.x
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # GPT-2
}
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5


def add_tokenizer(writer, model_dir: Path, vocab_size: int) -> dict:
    """Write the vocabulary, merges, special ids and chat template of `model_dir`; returns what it chose."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        raise TunesmithError(f"{model_dir}: cannot load the tokenizer ({str(exc).splitlines()[0]})") from None
    spec = _byte_level_bpe_spec(tokenizer, model_dir)
    tokens, token_types = vocabulary(spec, vocab_size)
    pre = pre_tokenizer_name(tokenizer, spec)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges(spec))
    eos_ids = end_of_turn_ids(model_dir, tokenizer)
    _add_special_ids(writer, tokenizer, eos_ids, vocab_size)
    add_bos, add_eos = _adds_bos_eos(tokenizer)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    writer.add_add_space_prefix(_adds_prefix_space(spec))
    if tokenizer.chat_template:
        writer.add_chat_template(_template_for_gguf(tokenizer.chat_template))
    return {"pre_tokenizer": pre, "eos_token_ids": eos_ids}


def _byte_level_bpe_spec(tokenizer, model_dir: Path) -> dict:
    """tokenizer.json as a dict, after checking it describes a byte-level BPE (the only kind written here)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model") or {}
    decoder = spec.get("decoder") or {}
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) or decoder.get("type") == "ByteLevel"
    if model.get("type") != "BPE" or not byte_level:
        raise TunesmithError(
            f"{model_dir}: only byte-level BPE tokenizers (GPT-2 style tokenizer.json: Llama 3, SmolLM, Qwen2) can be "
            f"exported to GGUF; this one is {model.get('type') or 'not a fast tokenizer'}"
            f"{'' if byte_level else ' without a ByteLevel pre-tokenizer (sentencepiece-style)'}"
        )
    return spec


def vocabulary(spec: dict, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token texts by id (byte-level spelling, added tokens as written) and llama.cpp token types.

    Ids the tokenizer does not use (embedding rows padded past the vocabulary) become unused `[PAD<id>]` tokens,
    as llama.cpp's converter writes them."""
    by_id = {index: token for token, index in spec["model"]["vocab"].items()}
    token_types = {index: TOKEN_NORMAL for index in by_id}
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        special = added.get("special") or _looks_special(added["content"])
        token_types[added["id"]] = TOKEN_CONTROL if special else TOKEN_USER_DEFINED
    if by_id and max(by_id) >= vocab_size:
        raise TunesmithError(f"the tokenizer has token id {max(by_id)} but the model's vocab_size is {vocab_size}")
    tokens = [by_id.get(index, f"[PAD{index}]") for index in range(vocab_size)]
    types = [token_types.get(index, TOKEN_UNUSED) for index in range(vocab_size)]
    return tokens, types


def _looks_special(text: str) -> bool:
    # llama.cpp's converter treats added tokens spelled <|...|> as control tokens even when not flagged special.
    return text.startswith("<|") and text.endswith("|>")


def merges(spec: dict) -> list[str]:
    """BPE merges as "left right" strings (tokenizers >= 0.20 stores pairs; a space inside one is spelled Ġ)."""
    raw = spec["model"].get("merges") or []
    if not raw:
        raise TunesmithError("the tokenizer has no BPE merges; it cannot be written as a GGUF byte-level vocabulary")
    if isinstance(raw[0], str):
        return list(raw)
    return [" ".join(part.replace(" ", "\u0120") for part in pair) for pair in raw]


def pre_tokenizer_name(tokenizer, spec: dict) -> str:
    """llama.cpp's name for how text is split before BPE: by llama.cpp's own hash check, else by the
    pre-tokenizer's shape; `default` when neither recognises it."""
    ids = tokenizer.encode(LLAMA_CPP_CHECK_TEXT)
    known = PRE_TOKENIZER_BY_HASH.get(sha256(str(ids).encode()).hexdigest())
    return known or _pre_tokenizer_by_shape(spec.get("pre_tokenizer") or {}) or "default"


def _pre_tokenizer_by_shape(pre: dict) -> str | None:
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_SPLIT

    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # GPT-2 split with each digit on its own (SmolLM, StarCoder)
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        if (steps[0].get("pattern") or {}).get("Regex") == QWEN2_SPLIT:
            return "qwen2"
    return None


def end_of_turn_ids(model_dir: Path, tokenizer) -> list[int]:
    """Where generation should stop: generation_config.json's eos_token_id (int or list), else config.json's,
    else the tokenizer's EOS."""
    for name in ("generation_config.json", "config.json"):
        path = model_dir / name
        value = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id") if path.is_file() else None
        if value is not None:
            ids = value if isinstance(value, list) else [value]
            if ids:
                return [int(index) for index in ids]
    if tokenizer.eos_token_id is None:
        raise TunesmithError(f"{model_dir}: no eos_token_id in generation_config.json or config.json, and no EOS token")
    return [tokenizer.eos_token_id]


def _add_special_ids(writer, tokenizer, eos_ids: list[int], vocab_size: int) -> None:
    """EOS is the first end-of-turn id; a second and third become EOT and EOM, which llama.cpp also stops on."""
    for index in eos_ids:
        if not 0 <= index < vocab_size:
            raise TunesmithError(f"end-of-turn id {index} is outside the vocabulary (size {vocab_size})")
    writer.add_eos_token_id(eos_ids[0])
    for add, index in zip((writer.add_eot_token_id, writer.add_eom_token_id), eos_ids[1:]):
        add(index)
    others = ((writer.add_bos_token_id, tokenizer.bos_token_id), (writer.add_unk_token_id, tokenizer.unk_token_id),
              (writer.add_pad_token_id, tokenizer.pad_token_id))
    for add, index in others:
        if index is not None:
            add(index)


def _adds_bos_eos(tokenizer) -> tuple[bool, bool]:
    """Whether encoding a text adds BOS in front / EOS behind (what llama.cpp must do itself)."""
    with_special = tokenizer("x", add_special_tokens=True)["input_ids"]
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bos is not None and with_special[:1] == [bos] and plain[:1] != [bos]
    add_eos = eos is not None and with_special[-1:] == [eos] and plain[-1:] != [eos]
    return add_bos, add_eos


def _adds_prefix_space(spec: dict) -> bool:
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return any(step.get("type") == "ByteLevel" and step.get("add_prefix_space") for step in steps)


def _template_for_gguf(template):
    """A single template as is; named templates (a dict) as llama.cpp's list of {name, template}."""
    if isinstance(template, dict):
        return [{"name": name, "template": text} for name, text in template.items()]
    return template
