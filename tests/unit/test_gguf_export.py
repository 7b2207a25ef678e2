"""GGUF export and Ollama Modelfile: tiny llama / mistral / qwen2 folders written to GGUF and read back by
transformers' own GGUF loader, which undoes llama.cpp's conventions (q/k permute, names, tokenizer keys)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CHATML, CORPUS
from tunesmith.errors import TunesmithError
from tunesmith.registry.gguf_export import llama3_rope_factors, write_gguf
from tunesmith.registry.ollama import chat_pieces, ollama_modelfile, render_like_ollama

# Text the qwen2 split cuts differently from GPT-2's (punctuation glued to words, digits one by one), so a wrong
# tokenizer.ggml.pre gives different ids after the round trip.
QWEN_TEXT = ["user_name = obj.value_name(first_name) # 12345 items", "x.bar_baz(_name) 2024-06-01 (hello) .value"]
PROMPTS = ["Send 3 red mugs to Lisbon", "Hello world, how are you today?", "x.bar_baz(_name) 2024"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def build_tiny_qwen2(target: Path) -> Path:
    """A 2-layer Qwen2 (q/k/v biases, untied head, ffn rows of 48 that q8_0/q4_0 cannot block) with a qwen2-split
    byte-level BPE, a vocabulary padded past the tokenizer, and two end-of-turn ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator((CORPUS + QWEN_TEXT) * 20, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    end_of_turn = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    torch.manual_seed(1)
    config = Qwen2Config(vocab_size=len(tokenizer) + 6, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=50000.0,
                         rms_norm_eps=1e-6, tie_word_embeddings=False, eos_token_id=end_of_turn[0],
                         pad_token_id=end_of_turn[1], use_sliding_window=False)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # every tensor distinct from its default, so a misplaced norm or bias shows
        for name, param in model.named_parameters():
            param.copy_(1 + 0.2 * torch.randn_like(param) if "norm" in name else 0.3 * torch.randn_like(param))
    model.generation_config.eos_token_id = end_of_turn
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def build_tiny_mistral(target: Path, tokenizer_dir: Path) -> Path:
    """The tiny llama's tokenizer on a 2-layer Mistral (written as llama to GGUF)."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(2)
    vocab = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    size = len(vocab["model"]["vocab"]) + len(vocab["added_tokens"])
    config = MistralConfig(vocab_size=size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           eos_token_id=2, bos_token_id=1, tie_word_embeddings=False, initializer_range=0.3,
                           sliding_window=None)
    MistralForCausalLM(config).save_pretrained(target)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, target / name)
    return target


@pytest.fixture(scope="module")
def model_dirs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf-models")
    return {"llama": tiny_model_dir, "mistral": build_tiny_mistral(root / "tiny-mistral", tiny_model_dir),
            "qwen2": build_tiny_qwen2(root / "qwen2")}


@pytest.fixture(scope="module")
def exported(model_dirs, tmp_path_factory):
    """write_gguf results by (arch, dtype), written once per module."""
    out = tmp_path_factory.mktemp("gguf-out")
    cache = {}

    def get(arch: str, dtype: str) -> dict:
        if (arch, dtype) not in cache:
            cache[arch, dtype] = write_gguf(model_dirs[arch], out / f"{arch}-{dtype}.gguf", dtype)
        return cache[arch, dtype]
    return get


def load_pair(model_dir: Path, gguf_path: Path):
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    loaded.eval()
    return original, loaded


def chat_ids(model_dir: Path, prompt: str) -> torch.Tensor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)["input_ids"]


@torch.no_grad()
def greedy(model, ids: torch.Tensor, steps: int = 6) -> list[int]:
    for _ in range(steps):
        ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids[0, -steps:].tolist()


def metadata(path: str) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    return {"fields": {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")},
            "types": {tensor.name: tensor.tensor_type.name for tensor in reader.tensors}}


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_f16_gguf_loads_back_with_the_same_logits_and_greedy_answers(arch, model_dirs, exported):
    info = exported(arch, "f16")
    original, loaded = load_pair(model_dirs[arch], Path(info["path"]))
    exact = load_pair(model_dirs[arch], Path(exported(arch, "f32")["path"]))[1]
    for prompt in PROMPTS:
        ids = chat_ids(model_dirs[arch], prompt)
        with torch.no_grad():
            want, got, got_f32 = original(ids).logits, loaded(ids).logits, exact(ids).logits
        torch.testing.assert_close(got_f32, want, atol=1e-4, rtol=1e-4)  # f32: only the layout changed
        torch.testing.assert_close(got, want, atol=0.05 * want.abs().max().item(), rtol=0.02)
        assert greedy(loaded, ids) == greedy(original, ids)
    assert info["architecture"] == ("qwen2" if arch == "qwen2" else "llama")
    assert info["tensors"] == len(metadata(info["path"])["types"])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tokenizer_and_chat_template_round_trip(arch, model_dirs, exported):
    from transformers import AutoTokenizer

    info = exported(arch, "f16")
    path = Path(info["path"])
    original = AutoTokenizer.from_pretrained(model_dirs[arch])
    loaded = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    chat = original.apply_chat_template([{"role": "user", "content": QWEN_TEXT[0]}], tokenize=False,
                                        add_generation_prompt=True)
    for text in [*PROMPTS, *QWEN_TEXT, chat, "  spaces\n\nand\ttabs  "]:
        assert loaded(text)["input_ids"] == original(text)["input_ids"], text
    assert loaded.chat_template == original.chat_template
    assert loaded.eos_token == "<|im_end|>"
    assert info["pre_tokenizer"] == {"llama": "gpt-2", "qwen2": "qwen2"}[arch]


def test_end_of_turn_ids_become_eos_and_eot(model_dirs, exported):
    from transformers import AutoTokenizer

    for arch in ("llama", "qwen2"):
        tokenizer = AutoTokenizer.from_pretrained(model_dirs[arch])
        fields = metadata(exported(arch, "f16")["path"])["fields"]
        assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert fields["tokenizer.ggml.pre"] == {"llama": "gpt-2", "qwen2": "qwen2"}[arch]
        assert fields["tokenizer.chat_template"] == CHATML
        types = fields["tokenizer.ggml.token_type"]
        assert types[tokenizer.convert_tokens_to_ids("<|im_start|>")] == 3  # control
    qwen = metadata(exported("qwen2", "f16")["path"])["fields"]
    qwen_tokenizer = AutoTokenizer.from_pretrained(model_dirs["qwen2"])
    assert qwen["tokenizer.ggml.eot_token_id"] == qwen_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert qwen["tokenizer.ggml.tokens"][-1].startswith("[PAD") and qwen["tokenizer.ggml.token_type"][-1] == 5


def test_tensor_types_follow_llama_cpp(exported):
    llama_f16 = metadata(exported("llama", "f16")["path"])
    assert "output.weight" not in llama_f16["types"]  # tied: llama.cpp reuses token_embd
    assert llama_f16["types"]["blk.0.attn_norm.weight"] == "F32"
    assert llama_f16["types"]["blk.0.attn_q.weight"] == "F16"
    llama_q4 = metadata(exported("llama", "q4_0")["path"])["types"]
    assert llama_q4["blk.1.ffn_down.weight"] == "Q4_0" and llama_q4["token_embd.weight"] == "Q8_0"
    qwen_q8 = exported("qwen2", "q8_0")
    types = metadata(qwen_q8["path"])["types"]
    assert types["blk.0.attn_q.bias"] == "F32" and types["output.weight"] == "Q8_0"
    assert types["blk.0.ffn_down.weight"] == "F16"  # rows of 48 do not split into blocks of 32
    assert any(note.startswith("blk.0.ffn_down.weight") for note in qwen_q8["fallbacks"])
    assert metadata(exported("qwen2", "bf16")["path"])["types"]["blk.0.ffn_up.weight"] == "BF16"


@pytest.mark.parametrize("dtype,least_correlation", [("bf16", 0.999), ("q8_0", 0.99), ("q4_0", 0.8)])
def test_quantized_files_load_back_close(dtype, least_correlation, model_dirs, exported):
    for arch in ("llama", "qwen2"):
        original, loaded = load_pair(model_dirs[arch], Path(exported(arch, dtype)["path"]))
        ids = chat_ids(model_dirs[arch], PROMPTS[0])
        with torch.no_grad():
            want, got = original(ids).logits.flatten(), loaded(ids).logits.flatten()
        assert not torch.equal(want, got)
        assert np.corrcoef(want.numpy(), got.numpy())[0, 1] > least_correlation, (arch, dtype)


def test_unsupported_architecture_and_dtype_are_clear_errors(model_dirs, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=32)).save_pretrained(gpt2)
    with pytest.raises(TunesmithError, match="llama, mistral, qwen2.*'gpt2'"):
        write_gguf(gpt2, tmp_path / "out" / "gpt2.gguf", "f16")
    with pytest.raises(TunesmithError, match="q4_0"):
        write_gguf(model_dirs["llama"], tmp_path / "out" / "x.gguf", "q4_k_m")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_interrupted_write_leaves_nothing_that_looks_finished(model_dirs, tmp_path):
    target = tmp_path / "export"
    seen = []

    def interrupt(name):
        seen.append(name)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_gguf(model_dirs["llama"], target / "model.gguf", "q8_0", on_tensor=interrupt)
    assert seen[0] == "token_embd.weight" and list(target.iterdir()) == []
    (target / "model.gguf").write_bytes(b"an earlier, finished export")
    with pytest.raises(KeyboardInterrupt):
        seen.clear()
        write_gguf(model_dirs["llama"], target / "model.gguf", "f16", on_tensor=interrupt)
    assert [p.name for p in target.iterdir()] == ["model.gguf"]
    assert (target / "model.gguf").read_bytes() == b"an earlier, finished export"


def test_llama3_rope_factors_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=131072, rope_parameters=rope)
    plain = LlamaConfig(hidden_size=256, num_attention_heads=4, rope_parameters={"rope_type": "default",
                                                                                  "rope_theta": 500000.0})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    base = 1.0 / (500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    np.testing.assert_allclose(llama3_rope_factors(config), (base / scaled).numpy(), rtol=1e-4)
    assert llama3_rope_factors(plain) is None


def test_ollama_modelfile_for_the_tiny_model(model_dirs):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dirs["llama"])
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    text = ollama_modelfile(tokenizer, "tiny.gguf", [end], None)
    assert text.startswith("FROM ./tiny.gguf\n")
    assert 'TEMPLATE """' in text and "{{ .Content }}" in text and "{{ .System }}" in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    assert 'SYSTEM """You are a helpful assistant."""' in text  # the template's default, made explicit
    assert 'SYSTEM """Be terse."""' in ollama_modelfile(tokenizer, "tiny.gguf", [end], "Be terse.")
    pieces = chat_pieces(tokenizer)
    conversation = [{"role": "system", "content": "S"}, {"role": "user", "content": "q {{ .Content }}"},
                    {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}]
    assert render_like_ollama(pieces, conversation) == tokenizer.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("template", [
    # drops system messages: the sentinel never shows up
    "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}</s>{% endif %}{% endfor %}",
    # numbers the turns: a message's wrapping depends on its position
    "{% for m in messages %}<turn {{ loop.index }}>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<turn>assistant: {% endif %}",
])
def test_a_template_ollama_cannot_express_raises(template, model_dirs):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dirs["llama"])
    tokenizer.chat_template = template
    with pytest.raises(TunesmithError, match="cannot be expressed as an Ollama template"):
        ollama_modelfile(tokenizer, "tiny.gguf", [2], None)
