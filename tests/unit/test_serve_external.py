"""`serve --engine vllm` and `--engine llamacpp`: the generated command lines and adapter layout on tiny trained runs,
the LoRA GGUF read back with gguf-py (and, where llama-cpp-python is installed, run by llama.cpp against peft), and
the process supervisor that runs the commands."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import order_rows, write_jsonl
from safetensors.torch import load_file, save_file

from tunesmith.errors import TunesmithError
from tunesmith.registry.gguf_export import permute_for_llama_rope, write_gguf
from tunesmith.registry.gguf_lora_export import write_lora_gguf
from tunesmith.registry.run import Run
from tunesmith.serve.external_engine import supervise
from tunesmith.serve.llamacpp_command import export_gguf_files, launch_llama_server, llama_server_commands
from tunesmith.serve.targets import ServedTarget
from tunesmith.serve.vllm_command import launch_vllm, max_lora_rank, vllm_commands

HOST = "0.0.0.0"


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory, tiny_model_dir) -> Path:
    return trained_run(tmp_path_factory.mktemp("adapter-run"), tiny_model_dir, "orders", "lora")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_model_dir) -> Path:
    return trained_run(tmp_path_factory.mktemp("full-run"), tiny_model_dir, "orders-full", "full")


def trained_run(root: Path, model_dir: Path, name: str, adapter: str) -> Path:
    """A tiny run prepared and trained for 2 steps (not evaluated: nothing here reads the evaluation)."""
    from tunesmith.config import load_config
    from tunesmith.data.prepare import prepare
    from tunesmith.train.sft import train_sft

    data = write_jsonl(root / "orders.jsonl", order_rows(40))
    (root / "run.yaml").write_text(yaml.safe_dump({
        "name": name, "base_model": str(model_dir), "output_dir": str(root / "runs"), "seed": 1,
        "data": {"train": str(data), "validation_fraction": 0.2, "max_length": 128},
        "train": {"adapter": adapter, "max_steps": 2, "batch_size": 4, "precision": "fp32", "threads": 1,
                  "learning_rate": 0.01 if adapter == "lora" else 0.001, "lora": {"r": 4, "alpha": 8}}}),
        encoding="utf-8")
    config = load_config(root / "run.yaml")
    run_dir = prepare(config)
    train_sft(run_dir, config)
    return run_dir


def copy_run(run_dir: Path, target: Path, **adapter_config) -> Path:
    """A copy of a run whose adapter_config.json has `adapter_config` merged in."""
    shutil.copytree(run_dir, target)
    path = target / "adapter" / "adapter_config.json"
    if adapter_config:
        path.write_text(json.dumps({**json.loads(path.read_text()), **adapter_config}), encoding="utf-8")
    return target


def served(name: str, run_dir: Path) -> ServedTarget:
    return ServedTarget(name, Run.open(run_dir))


# --- vLLM ------------------------------------------------------------------------------------------------------

def test_two_adapters_on_one_base_are_one_vllm_serve_with_both_lora_modules(adapter_run, tiny_model_dir, tmp_path):
    staging = copy_run(adapter_run, tmp_path / "staging")
    targets = [served("orders@production", adapter_run), served("orders@staging", staging)]
    [launch] = vllm_commands(targets, HOST, 8000)
    modules = launch.argv[launch.argv.index("--lora-modules") + 1:launch.argv.index("--max-lora-rank")]
    assert launch.argv == ["vllm", "serve", str(tiny_model_dir.resolve()), "--served-model-name",
                           tiny_model_dir.name, "--enable-lora", "--lora-modules", *modules, "--max-lora-rank", "8",
                           "--max-loras", "2", "--host", HOST, "--port", "8000"]
    assert [json.loads(m) for m in modules] == [
        {"name": "orders@production", "path": str((adapter_run / "adapter").resolve()),
         "base_model_name": tiny_model_dir.name},
        {"name": "orders@staging", "path": str((staging / "adapter").resolve()),
         "base_model_name": tiny_model_dir.name}]
    # vLLM reads an item as `name=path` when it has "=" and no ","; ours must go down its JSON branch.
    assert all("," in m for m in modules)
    for module in modules:
        folder = Path(json.loads(module)["path"])
        assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    assert launch.port == 8000 and launch.served_names == [tiny_model_dir.name, "orders@production", "orders@staging"]


@pytest.mark.parametrize(("ranks", "expected"), [([1], 8), ([4, 8], 8), ([16], 16), ([17, 3], 32), ([300], 320),
                                                 ([512], 512)])
def test_max_lora_rank_is_the_smallest_vllm_choice_that_holds_every_adapter(ranks, expected):
    assert max_lora_rank(ranks) == expected


def test_max_lora_rank_reads_each_adapter_config_and_refuses_ranks_vllm_cannot_hold(adapter_run, tmp_path):
    wide = copy_run(adapter_run, tmp_path / "wide", r=20)
    patterned = copy_run(adapter_run, tmp_path / "patterned", rank_pattern={"q_proj": 40})
    [launch] = vllm_commands([served("a", adapter_run), served("b", wide), served("c", patterned)], HOST, 8000)
    assert launch.argv[launch.argv.index("--max-lora-rank") + 1] == "64"
    huge = copy_run(adapter_run, tmp_path / "huge", r=1024)
    with pytest.raises(TunesmithError, match="above vLLM's largest --max-lora-rank"):
        vllm_commands([served("a", huge)], HOST, 8000)


def test_a_full_fine_tune_gets_its_own_vllm_serve_on_the_next_port(adapter_run, full_run, tiny_model_dir):
    targets = [served("orders@production", adapter_run), served("orders-full@1", full_run)]
    shared, full = vllm_commands(targets, "127.0.0.1", 9000, extra_args=["--dtype", "float32"])
    assert full.argv == ["vllm", "serve", str((full_run / "model").resolve()), "--served-model-name", "orders-full@1",
                         "--host", "127.0.0.1", "--port", "9001", "--gpu-memory-utilization", "0.45",
                         "--dtype", "float32"]
    assert (full_run / "model" / "config.json").is_file() and (full_run / "model" / "tokenizer.json").is_file()
    assert shared.argv[-4:] == ["--gpu-memory-utilization", "0.45", "--dtype", "float32"]
    assert (shared.port, full.port, full.served_names) == (9000, 9001, ["orders-full@1"])
    own_share = vllm_commands(targets, HOST, 9000, extra_args=["--gpu-memory-utilization=0.3"])
    assert all(launch.argv[-1] == "--gpu-memory-utilization=0.3" and launch.argv.count("--gpu-memory-utilization") == 0
               for launch in own_share)


def test_base_alone_gets_a_process_only_when_no_adapter_brings_it(full_run, tiny_model_dir):
    full, base = vllm_commands([served("orders-full", full_run)], HOST, 8000, base=True)
    assert base.argv[:5] == ["vllm", "serve", str(tiny_model_dir.resolve()), "--served-model-name", tiny_model_dir.name]
    assert base.port == 8001 and "--enable-lora" not in base.argv
    assert [launch.served_names for launch in vllm_commands([served("orders-full", full_run)], HOST, 8000,
                                                            base=False)] == [["orders-full"]]


@pytest.mark.parametrize(("change", "message"), [
    ({"use_dora": True}, "DoRA adapter, which vLLM's LoRA serving does not support"),
    ({"modules_to_save": ["lm_head"]}, r"saves whole modules \(lm_head\), which vLLM refuses.*merged"),
    ({"bias": "lora_only"}, "trains biases"),
])
def test_adapters_vllm_cannot_load_are_refused_with_what_to_do(adapter_run, tmp_path, change, message):
    changed = copy_run(adapter_run, tmp_path / "changed", **change)
    with pytest.raises(TunesmithError, match=message):
        vllm_commands([served("orders@production", changed)], HOST, 8000)


def test_adapter_layout_is_checked_file_by_file_and_layer_by_layer(adapter_run, tmp_path):
    missing = copy_run(adapter_run, tmp_path / "missing")
    (missing / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(TunesmithError, match="lacks adapter_model.safetensors"):
        vllm_commands([served("m", missing)], HOST, 8000)
    odd = copy_run(adapter_run, tmp_path / "odd")
    weights = load_file(odd / "adapter" / "adapter_model.safetensors")
    weights = {key.replace("mlp.down_proj", "mlp.shortcut"): value for key, value in weights.items()}
    save_file(weights, odd / "adapter" / "adapter_model.safetensors")
    with pytest.raises(TunesmithError, match="adapts shortcut, which vLLM does not put LoRA on"):
        vllm_commands([served("o", odd)], HOST, 8000)


def test_a_version_named_like_its_base_is_refused(adapter_run, tiny_model_dir):
    with pytest.raises(TunesmithError, match=f"both be called '{tiny_model_dir.name}'"):
        vllm_commands([served(tiny_model_dir.name, adapter_run)], HOST, 8000)


def test_launch_vllm_without_vllm_says_how_to_install_it(adapter_run, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(TunesmithError, match="pip install vllm"):
        launch_vllm([served("orders", adapter_run)], HOST, 8000)


def test_launch_vllm_runs_the_commands_and_returns_their_exit_code(adapter_run, tmp_path, monkeypatch):
    record = tmp_path / "argv.json"
    fake_bin(tmp_path / "bin", "vllm", f"import json, sys; json.dump(sys.argv[1:], open({str(record)!r}, 'w')); "
                                       "sys.exit(5)", monkeypatch)
    targets = [served("orders", adapter_run)]
    assert launch_vllm(targets, HOST, 8123) == 5
    assert json.loads(record.read_text()) == vllm_commands(targets, HOST, 8123)[0].argv[1:]


def test_launch_vllm_refuses_weights_changed_since_training(adapter_run, tmp_path, monkeypatch):
    tampered = copy_run(adapter_run, tmp_path / "tampered")
    weights = load_file(tampered / "adapter" / "adapter_model.safetensors")
    save_file({key: value * 2 for key, value in weights.items()}, tampered / "adapter" / "adapter_model.safetensors")
    fake_bin(tmp_path / "bin", "vllm", "raise SystemExit(0)", monkeypatch)
    with pytest.raises(TunesmithError, match="changed after training"):
        launch_vllm([served("orders", tampered)], HOST, 8000)


def fake_bin(folder: Path, name: str, python: str, monkeypatch) -> None:
    """An executable `name` on PATH that runs `python`."""
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(f"#!{sys.executable}\n{python}\n", encoding="utf-8")
    path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")


# --- supervising the processes ---------------------------------------------------------------------------------

def test_supervise_returns_the_first_exit_code_and_stops_the_others():
    started = time.monotonic()
    code = supervise([[sys.executable, "-c", "import time; time.sleep(60)"], [sys.executable, "-c", "exit(3)"]],
                     grace_s=5)
    assert code == 3 and time.monotonic() - started < 10


def test_supervise_passes_sigterm_on_to_every_child(tmp_path):
    """The supervisor runs in its own process; SIGTERM to it reaches both children, and it exits with the code
    of the first child to finish."""
    child = textwrap.dedent(f"""
        import pathlib, signal, sys, time
        tag = sys.argv[1]
        def stop(signum, frame):
            pathlib.Path({str(tmp_path)!r}, tag + '.stopped').write_text(str(signum))
            sys.exit(7)
        signal.signal(signal.SIGTERM, stop)
        pathlib.Path({str(tmp_path)!r}, tag + '.ready').touch()
        time.sleep(60)
    """)
    (tmp_path / "child.py").write_text(child, encoding="utf-8")
    parent = (f"import sys; from tunesmith.serve.external_engine import supervise; "
              f"sys.exit(supervise([[sys.executable, {str(tmp_path / 'child.py')!r}, tag] for tag in ('a', 'b')], 10))")
    process = subprocess.Popen([sys.executable, "-c", parent])
    deadline = time.monotonic() + 30
    while not all((tmp_path / f"{tag}.ready").exists() for tag in "ab"):
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 7
    assert [(tmp_path / f"{tag}.stopped").read_text() for tag in "ab"] == [str(int(signal.SIGTERM))] * 2


# --- llama.cpp -------------------------------------------------------------------------------------------------

def test_lora_gguf_holds_peft_weights_under_llama_cpp_names_and_shapes(adapter_run, tiny_model_dir, tmp_path):
    import gguf

    adapter = adapter_run / "adapter"
    result = write_lora_gguf(adapter, tiny_model_dir, tmp_path / "orders.gguf", dtype="f32")
    reader = gguf.GGUFReader(tmp_path / "orders.gguf")
    fields = {name: reader.fields[name].contents() for name in
              ("general.architecture", "general.type", "adapter.type", "adapter.lora.alpha")}
    assert fields == {"general.architecture": "llama", "general.type": "adapter", "adapter.type": "lora",
                      "adapter.lora.alpha": 8.0}
    peft = {key: value.numpy() for key, value in load_file(adapter / "adapter_model.safetensors").items()}
    expected = {}
    for key, value in peft.items():
        layer, module = key.split(".layers.")[1].split(".")[0], key.split(".lora_")[0].rsplit(".", 1)[-1]
        name = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[module]
        part = "lora_a" if ".lora_A." in key else "lora_b"
        if part == "lora_b" and module in ("q_proj", "k_proj"):  # regrouped like the base GGUF's q/k rows
            value = permute_for_llama_rope(value, 4 if module == "q_proj" else 2)
        expected[f"blk.{layer}.{name}.weight.{part}"] = value
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    assert set(tensors) == set(expected) and result["tensors"] == len(expected) == 28
    for name, tensor in tensors.items():
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
        assert tuple(tensor.shape) == expected[name].shape[::-1]  # GGUF lists ne0 (the row length) first
        np.testing.assert_array_equal(np.asarray(tensor.data).reshape(expected[name].shape), expected[name])
    assert tuple(tensors["blk.0.attn_q.weight.lora_a"].shape) == (32, 4)  # llama.cpp: a->ne = (in, rank)
    assert tuple(tensors["blk.0.attn_k.weight.lora_b"].shape) == (4, 16)  # b->ne = (rank, out)


def test_lora_gguf_in_f16_and_with_rank_stabilized_alpha(adapter_run, tiny_model_dir, tmp_path):
    import gguf

    rslora = copy_run(adapter_run, tmp_path / "rslora", use_rslora=True)
    write_lora_gguf(rslora / "adapter", tiny_model_dir, tmp_path / "rs.gguf", dtype="f16")
    reader = gguf.GGUFReader(tmp_path / "rs.gguf")
    # llama.cpp scales by alpha / rank; rsLoRA by lora_alpha / sqrt(rank): 16 / 4 == 8 / sqrt(4).
    assert reader.fields["adapter.lora.alpha"].contents() == pytest.approx(8 * math.sqrt(4))
    assert {tensor.tensor_type for tensor in reader.tensors} == {gguf.GGMLQuantizationType.F16}


@pytest.mark.parametrize(("change", "message"), [({"use_dora": True}, "DoRA adapter; llama.cpp applies plain LoRA"),
                                                 ({"modules_to_save": ["lm_head"]}, "whole modules or biases"),
                                                 ({"alpha_pattern": {"q_proj": 2}}, "per-layer alpha")])
def test_lora_gguf_refuses_what_llama_cpp_cannot_apply(adapter_run, tiny_model_dir, tmp_path, change, message):
    changed = copy_run(adapter_run, tmp_path / "changed", **change)
    with pytest.raises(TunesmithError, match=message):
        write_lora_gguf(changed / "adapter", tiny_model_dir, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*.gguf*"))


def test_llama_server_serves_adapters_of_one_base_from_one_process(adapter_run, full_run, tiny_model_dir, tmp_path):
    staging = copy_run(adapter_run, tmp_path / "staging")
    targets = [served("orders@production", adapter_run), served("orders@staging", staging),
               served("orders-full@1", full_run)]
    files = export_gguf_files(targets, cache_dir=tmp_path / "cache")
    written = {path: path.stat().st_mtime_ns for path in (tmp_path / "cache").iterdir()}
    assert len(written) == 3  # one base GGUF and one LoRA GGUF (the copy has the same weights), one full model
    assert export_gguf_files(targets, cache_dir=tmp_path / "cache") == files  # reused, not rewritten
    assert {path: path.stat().st_mtime_ns for path in (tmp_path / "cache").iterdir()} == written
    shared, full = llama_server_commands(targets, files, HOST, 8080, extra_args=["-ngl", "99"])
    base_gguf = str(files.bases[str(tiny_model_dir)].resolve())
    lora = str(files.models["orders@production"].resolve())
    assert shared.argv == ["llama-server", "-m", base_gguf, "--alias", tiny_model_dir.name, "--lora", lora,
                           "--lora", lora, "--lora-init-without-apply", "--jinja", "--host", HOST, "--port", "8080",
                           "-ngl", "99"]
    assert shared.lora_ids == {"orders@production": 0, "orders@staging": 1}
    assert shared.lora_field("orders@staging") == [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 1.0}]
    assert shared.lora_field(tiny_model_dir.name) == [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 0.0}]
    assert full.argv[:5] == ["llama-server", "-m", str(files.models["orders-full@1"].resolve()), "--alias",
                             "orders-full@1"]
    assert full.port == 8081 and full.lora_ids == {}
    with pytest.raises(TunesmithError, match="not served on port 8081"):
        full.lora_field("orders@staging")


def test_launch_llama_server_without_the_binary_says_how_to_build_it(adapter_run, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(TunesmithError, match=r"llama-server is not on PATH.*cmake.*`make llamacpp` installs only"):
        launch_llama_server([served("orders", adapter_run)], HOST, 8080)


def test_llama_cpp_with_the_lora_gguf_computes_what_peft_computes(adapter_run, tiny_model_dir, tmp_path):
    """Optional: needs llama-cpp-python (`make llamacpp`). Logits of base GGUF + LoRA GGUF in llama.cpp against the
    peft model, with the adapter's own effect as the yardstick."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import torch

    from tunesmith.models import load_tokenizer, load_with_adapter

    write_gguf(tiny_model_dir, tmp_path / "base.gguf", "f32")
    write_lora_gguf(adapter_run / "adapter", tiny_model_dir, tmp_path / "lora.gguf", dtype="f32")
    ids = load_tokenizer(tiny_model_dir)("Send 3 red mugs to Lisbon (ref 12)")["input_ids"]
    llm = llama_cpp.Llama(model_path=str(tmp_path / "base.gguf"), lora_path=str(tmp_path / "lora.gguf"), n_ctx=64,
                          logits_all=True, verbose=False, seed=0)
    llm.eval(ids)
    served_logits = np.array(llm.scores[:len(ids)])
    model = load_with_adapter(tiny_model_dir, adapter_run / "adapter")
    with torch.no_grad():
        tuned = model(torch.tensor([ids])).logits[0].numpy()
        with model.disable_adapter():
            base = model(torch.tensor([ids])).logits[0].numpy()
    effect = np.abs(tuned - base).max()
    assert effect > 0.1  # the adapter moved the logits, so a dropped or misplaced LoRA tensor would show
    assert np.abs(served_logits - tuned).max() < 0.05 * effect
    assert (served_logits.argmax(-1) == tuned.argmax(-1)).all()


@pytest.mark.skipif(shutil.which("llama-server") is None, reason="needs llama.cpp's llama-server on PATH")
def test_llama_server_answers_as_each_served_name_like_peft(adapter_run, tiny_model_dir, tmp_path):
    """Optional: a real llama-server on the generated command; greedy tokens per served name against peft's."""
    import httpx
    import torch

    from tunesmith.models import load_tokenizer, load_with_adapter

    targets = [served("orders@production", adapter_run)]
    files = export_gguf_files(targets, cache_dir=tmp_path / "cache", dtype="f32")
    port = free_port()
    [launch] = llama_server_commands(targets, files, "127.0.0.1", port, extra_args=["-c", "256", "-np", "1"])
    tokenizer = load_tokenizer(tiny_model_dir)
    ids = tokenizer("Send 3 red mugs to Lisbon (ref 12)")["input_ids"]
    stop = {tokenizer.convert_tokens_to_ids(token) for token in ("<|im_end|>", "<|endoftext|>")}
    model = load_with_adapter(tiny_model_dir, adapter_run / "adapter")
    with torch.no_grad():
        tuned = greedy(model, ids, stop)
        with model.disable_adapter():
            base = greedy(model, ids, stop)
    with open(tmp_path / "llama-server.log", "wb") as log:
        process = subprocess.Popen(launch.argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while not _healthy(url):
            assert process.poll() is None, (tmp_path / "llama-server.log").read_text(errors="replace")[-2000:]
            assert time.monotonic() < deadline, "llama-server did not become healthy"
            time.sleep(0.2)

        def complete(name: str) -> list[int]:
            body = {"prompt": ids, "n_predict": 8, "temperature": 0, "cache_prompt": False, "return_tokens": True,
                    "lora": launch.lora_field(name)}
            tokens = httpx.post(f"{url}/completion", json=body, timeout=60).json()["tokens"]
            return [token for token in tokens if token not in stop]

        assert complete("orders@production") == tuned
        assert complete(tiny_model_dir.name) == base
        assert tuned != base  # the two names answer differently, so the adapter really is chosen per request
    finally:
        process.terminate()
        process.wait(timeout=30)


def greedy(model, ids: list[int], stop: set[int], count: int = 8) -> list[int]:
    import torch

    out = []
    for _ in range(count):
        token = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
        if token in stop:
            break
        out.append(token)
    return out


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
