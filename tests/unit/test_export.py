"""`tunesmith export` of a registered tiny run: merged folders bare transformers loads, GGUF and Ollama files, each
checked to answer like its source before it is kept and recorded; interrupted exports leave nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tunesmith.cli.main import app
from tunesmith.errors import TunesmithError

from conftest import make_trained_run


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir) -> Path:
    return make_trained_run(tmp_path_factory.mktemp("export-run"), tiny_model_dir, "orders", seed=0, steps=6)


@pytest.fixture
def registered(tmp_path, monkeypatch, trained_run):
    from tunesmith.registry.register import register_run
    from tunesmith.registry.store import Registry

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    store = Registry()
    info, _ = register_run(store, trained_run, "orders")
    return store, info


def export(*args) -> object:
    return CliRunner().invoke(app, ["export", *args], env={"COLUMNS": "200"})


BARE_LOAD = """
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
folder = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(folder)
tokenizer = AutoTokenizer.from_pretrained(folder)
ids = tokenizer.apply_chat_template([{"role": "user", "content": "Send 2 red mug to Oslo"}], add_generation_prompt=True,
                                    return_tensors="pt", return_dict=True)
out = model.generate(**ids, max_new_tokens=4, do_sample=False)
print(json.dumps({"tunesmith_imported": any(m.startswith("tunesmith") for m in sys.modules),
                  "eos": model.generation_config.eos_token_id, "im_end": tokenizer.convert_tokens_to_ids("<|im_end|>"),
                  "new_tokens": out.shape[1] - ids["input_ids"].shape[1]}))
"""


def test_merged_export_answers_like_base_plus_adapter_and_loads_without_tunesmith(registered, tmp_path):
    store, info = registered
    result = export("orders@1", "--format", "merged", "--out", str(tmp_path / "merged"))
    assert result.exit_code == 0, result.output
    folder = tmp_path / "merged"
    record = json.loads((folder / "export.json").read_text())
    assert record["checks"]["agreement"] == 1.0 and record["checks"]["max_logit_difference"] < 1e-3
    assert record["checks"]["compared_with"] == "base + adapter" and record["dtype"] == "float32"
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("adapter_*"))
    loaded = subprocess.run([sys.executable, "-c", BARE_LOAD, str(folder)], capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr
    facts = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert not facts["tunesmith_imported"] and facts["eos"] == facts["im_end"] and facts["new_tokens"] >= 1
    # Recorded with the version, with every file's hash.
    exports = store.version_info("orders", info.version).exports
    assert len(exports) == 1 and exports[0].files["model.safetensors"] == record["files"]["model.safetensors"]


def test_gguf_and_ollama_exports_are_checked_against_the_merged_model(registered, tmp_path):
    # f32 is lossless (so it must agree); f16 rounding flips near-tied greedy choices of this random tiny model.
    result = export("orders@1", "--format", "ollama", "--dtype", "f32", "--out", str(tmp_path / "ollama"))
    assert result.exit_code == 0, result.output
    folder = tmp_path / "ollama"
    record = json.loads((folder / "export.json").read_text())
    assert record["checks"]["agreement"] == 1.0 and record["checks"]["compared_with"] == "the merged model"
    assert record["checks"]["max_logit_difference"] < 1e-3
    modelfile = (folder / "Modelfile").read_text()
    assert "FROM ./orders-v1-f32.gguf" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    quantized = export("orders@1", "--format", "gguf", "--dtype", "q4_0", "--out", str(tmp_path / "q4"))
    assert quantized.exit_code == 0, quantized.output  # lossy: agreement is reported, not required
    checks = json.loads((tmp_path / "q4" / "export.json").read_text())["checks"]
    assert 0 <= checks["agreement"] <= 1 and "perplexity_change" in checks


@pytest.mark.parametrize("args, message", [
    (["orders@1", "--format", "onnx"], "choose one of merged, gguf, ollama"),
    (["orders@1", "--format", "gguf", "--dtype", "q2_k"], "choose one of f32, f16, bf16, q8_0, q4_0"),
    (["orders@1", "--format", "merged", "--dtype", "q8_0"], "choose fp32, bf16 or fp16"),
    (["orders@9", "--format", "merged"], "has no version 9"),
])
def test_bad_export_requests_are_one_clear_error(registered, args, message):
    result = export(*args)
    assert isinstance(result.exception, TunesmithError) and message in str(result.exception)


def test_an_interrupted_export_leaves_nothing_that_looks_finished(registered, tmp_path, monkeypatch):
    import tunesmith.evaluate.agreement as agreement

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(agreement, "compare_answers", interrupted)
    result = export("orders@1", "--format", "merged", "--out", str(tmp_path / "out" / "merged"))
    assert result.exit_code == 130  # Ctrl-C
    assert list((tmp_path / "out").iterdir()) == []  # neither the folder nor its staging copy
    assert registered[0].version_info("orders", "1").exports == []
