"""Run-directory files are written atomically yet end up with the permissions of any normal file (the umask's)."""

from __future__ import annotations

import os
import stat

import pytest

from tunesmith.registry.run_dir import staged_dir, write_json_atomic


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_atomic_files_and_staged_folders_follow_the_umask(tmp_path, umask_022):
    write_json_atomic(tmp_path / "run" / "manifest.json", {"a": 1})
    with staged_dir(tmp_path / "run" / "adapter") as staging:
        (staging / "weights.bin").write_bytes(b"x")
    assert stat.S_IMODE((tmp_path / "run" / "manifest.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "run" / "adapter").stat().st_mode) == 0o755  # readable by a serving user


def test_a_failed_stage_leaves_no_folder_and_keeps_the_old_one(tmp_path, umask_022):
    final = tmp_path / "adapter"
    with staged_dir(final) as staging:
        (staging / "old").write_text("old")
    with pytest.raises(RuntimeError), staged_dir(final) as staging:
        (staging / "new").write_text("half")
        raise RuntimeError("crash mid-write")
    assert [p.name for p in final.iterdir()] == ["old"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


V1_MANIFEST = {  # the layout before typed records: no version, same sections
    "name": "old", "base_model": {"name": "default", "source": "/models/x"},
    "data": {"kind": "sft", "rows": {"train": 8, "validation": 2}, "dataset_hash": "ab" * 32,
             "chat_template_sha": "0123456789abcdef", "tokens": {"train": {"total": 10}}},
    "train": {"method": "lora-sft", "adapter": "lora", "adapter_dir": "adapter", "model_dir": None, "parent": None,
              "data_hash": "ab" * 32, "base_model": {"name": "default", "source": "/models/x"}, "config": {"epochs": 1},
              "metrics": {"steps": 3}, "loss_curve": [{"step": 1, "loss": 2.0}]},
    "environment": {"python": "3.11"},
}


def test_a_run_of_the_previous_layout_loads_and_records_in_the_new_one(tmp_path):
    from tunesmith.records import MANIFEST_VERSION
    from tunesmith.registry.run import Run
    from tunesmith.registry.run_dir import read_json

    write_json_atomic(tmp_path / "manifest.json", V1_MANIFEST)
    run = Run.open(tmp_path)
    assert run.manifest.version == 1 and run.weights_dir == tmp_path / "adapter" and not run.is_full_fine_tune
    assert run.trained.loss_curve[0].loss == 2.0 and run.manifest.data.tokens["train"]["total"] == 10
    run.record("evaluate", {"report": "eval/report.json", "results": {"base": {"exact_match": 0.5}}})
    written = read_json(tmp_path / "manifest.json")
    assert written["version"] == MANIFEST_VERSION and written["train"] == V1_MANIFEST["train"]
    assert Run.open(tmp_path).manifest.evaluate.results["base"]["exact_match"] == 0.5


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["data"].pop("dataset_hash"), r"data\.dataset_hash: Field required"),
    (lambda m: m.update(version=99), "written by a newer tunesmith"),
    (lambda m: m["train"].update(loss_curve="lots"), r"train\.loss_curve"),
])
def test_a_manifest_that_does_not_match_the_contract_is_one_clear_error(tmp_path, edit, message):
    import copy

    from tunesmith.errors import TunesmithError
    from tunesmith.registry.run import Run

    manifest = copy.deepcopy(V1_MANIFEST)
    edit(manifest)
    write_json_atomic(tmp_path / "manifest.json", manifest)
    with pytest.raises(TunesmithError, match=message):
        Run.open(tmp_path)


def test_an_untrained_run_and_a_changed_template_say_what_to_run(tmp_path, tiny_model_dir):
    from tunesmith.errors import TunesmithError
    from tunesmith.models import load_tokenizer
    from tunesmith.registry.run import Run

    write_json_atomic(tmp_path / "manifest.json", {k: v for k, v in V1_MANIFEST.items() if k != "train"})
    run = Run.open(tmp_path)
    with pytest.raises(TunesmithError, match="has not been trained yet; run `tunesmith train"):
        run.weights_dir
    with pytest.raises(TunesmithError, match="chat template of the base model differs.*re-run `tunesmith prepare`"):
        run.check_template(load_tokenizer(tiny_model_dir))


def _dead_pid() -> int:
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_later_stage_removes_what_a_killed_writer_left_but_never_live_work(tmp_path):
    import time

    from tunesmith.registry import run_dir

    host = run_dir._HOST
    killed = tmp_path / f".quickstart.tmp-{_dead_pid()}.{host}-abc123"
    live = tmp_path / f".quickstart.tmp-{os.getpid()}.{host}-def456"
    elsewhere = tmp_path / f".quickstart.tmp-{_dead_pid()}.{'0' * 8 if host != '0' * 8 else '1' * 8}-ghi789"
    old_unnamed, new_unnamed = tmp_path / ".quickstart.tmp-k2j4h5g6", tmp_path / ".quickstart.tmp-z9y8x7w6"
    other_run = tmp_path / f".other.tmp-{_dead_pid()}.{host}-abc123"
    for folder in (killed, live, elsewhere, old_unnamed, new_unnamed, other_run):
        folder.mkdir()
        (folder / "train.jsonl").write_text("half")
    hour_ago = time.time() - 3600
    os.utime(old_unnamed, (hour_ago, hour_ago))
    with staged_dir(tmp_path / "quickstart") as staging:
        assert staging.name.startswith(f".quickstart.tmp-{os.getpid()}.{host}-")
        (staging / "manifest.json").write_text("{}")
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {"quickstart", live.name, elsewhere.name, new_unnamed.name, other_run.name}


def test_sigterm_during_a_cli_command_unwinds_and_removes_the_staged_folder(tmp_path):
    import subprocess
    import sys

    import yaml

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"name": "t", "output_dir": str(tmp_path / "runs"),
                                      "data": {"train": "train.jsonl"}}), encoding="utf-8")
    script = (  # prepare, killed by SIGTERM (as `timeout` does) while it writes its staged run directory
        "import os, signal, sys, time\n"
        "import tunesmith.data.prepare as stage\n"
        "from tunesmith.registry.run_dir import staged_dir\n"
        "def prepare(config, overwrite=False):\n"
        "    with staged_dir(config.run_dir) as staging:\n"
        "        (staging / 'half.jsonl').write_text('x')\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        time.sleep(30)\n"
        "stage.prepare = prepare\n"
        "from tunesmith.cli.main import main\n"
        f"sys.argv = ['tunesmith', 'prepare', {str(config)!r}]\n"
        "main()\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 143, result.stderr
    assert "terminated (SIGTERM)" in result.stderr and "Traceback" not in result.stderr
    assert list((tmp_path / "runs").iterdir()) == []
