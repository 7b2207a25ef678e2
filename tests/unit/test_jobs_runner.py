"""The fine-tuning job runner on the tiny model: events, checkpoints, result, registry; bad input; SIGTERM, resume."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import order_rows, write_jsonl
from tunesmith.jobs.job_folder import JobFolder
from tunesmith.jobs.records import CheckpointLine, JobEventLine, JobResult, JobSpec
from tunesmith.jobs.runner import main
from tunesmith.jobs.training_reports import TrainingReporter

SEED = 3
EPOCHS, BATCH, ROWS = 3, 4, 16  # ~13 training rows after the held-out slice: 4 steps an epoch, 12 in all


def _job(folder: Path, model_dir: Path, job_id: str, training_file: Path, method: str = "supervised",
         **hyperparameters) -> Path:
    job_dir = folder / job_id
    job_dir.mkdir(parents=True)
    spec = JobSpec(job_id=job_id, owner=None, owner_name=None, model="tiny", base_model=str(model_dir), method=method,
                   training_file=str(training_file), seed=SEED, fine_tuned_model=f"ft:tiny:tunesmith::{job_id}",
                   hyperparameters={"n_epochs": EPOCHS, "batch_size": BATCH, **hyperparameters})
    (job_dir / "job.json").write_text(spec.model_dump_json(), encoding="utf-8")
    return job_dir


def _events(job_dir: Path) -> list[JobEventLine]:
    lines = (job_dir / "events.jsonl").read_text(encoding="utf-8").splitlines()
    return [JobEventLine.model_validate_json(line) for line in lines]


def _checkpoints(job_dir: Path) -> list[CheckpointLine]:
    lines = (job_dir / "checkpoints.jsonl").read_text(encoding="utf-8").splitlines()
    return [CheckpointLine.model_validate_json(line) for line in lines]


def _result(job_dir: Path) -> JobResult:
    return JobResult.model_validate_json((job_dir / "result.json").read_text(encoding="utf-8"))


def _loss_curve(job_dir: Path) -> list[dict]:
    return json.loads((job_dir / "run" / "manifest.json").read_text(encoding="utf-8"))["train"]["loss_curve"]


@pytest.fixture(scope="module", autouse=True)
def one_core():
    """Train on one core: the tiny model gains nothing from two, and two threads stall badly on a busy shared CPU."""
    import torch

    if not hasattr(os, "sched_setaffinity"):  # macOS: training uses os.cpu_count() threads there
        yield
        return
    cores, threads = os.sched_getaffinity(0), torch.get_num_threads()
    os.sched_setaffinity(0, {min(cores)})
    yield
    os.sched_setaffinity(0, cores)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    """(job folder, tunesmith home) of one supervised job run to the end in its own home."""
    folder = tmp_path_factory.mktemp("jobs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TUNESMITH_HOME", str(folder / "home"))
        rows = write_jsonl(folder / "orders.jsonl", order_rows(ROWS))
        job_dir = _job(folder, tiny_model_dir, "ftjob-supervised", rows)
        assert main([str(job_dir)]) == 0
    return job_dir, folder / "home"


def test_a_supervised_job_reports_each_stage_trains_checkpoints_and_registers(finished_job, monkeypatch):
    from peft import PeftModel
    from safetensors.torch import load_file

    from tunesmith.models import load_model
    from tunesmith.registry.hashing import file_sha256
    from tunesmith.registry.store import Registry

    job_dir, home = finished_job
    events = _events(job_dir)
    messages = [e.message for e in events if e.type == "message"]
    in_order = ["Validating training file", "Files validated", "Fine-tuning job started",
                "Checkpoint created at step 4", "Checkpoint created at step 8", "New fine-tuned model created",
                "The job has successfully completed"]
    assert [m for m in messages if m in in_order] == in_order
    metrics = [e.data for e in events if e.type == "metrics"]
    assert [m["step"] for m in metrics] == list(range(1, 13)) and {m["total_steps"] for m in metrics} == {12}
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"] and metrics[-1]["trained_tokens"] > 0
    assert any("valid_loss" in m for m in metrics)

    checkpoints = _checkpoints(job_dir)
    assert [c.step_number for c in checkpoints] == [4, 8, 12]
    assert checkpoints[0].fine_tuned_model_checkpoint == "ft:tiny:tunesmith::ftjob-supervised:ckpt-step-4"
    base_dir = json.loads((job_dir / "run" / "manifest.json").read_text())["base_model"]["source"]
    adapters = {}
    for line in (checkpoints[0], checkpoints[-1]):
        model = PeftModel.from_pretrained(load_model(base_dir), line.path + "/adapter")
        adapters[line.step_number] = {k: v for k, v in model.state_dict().items() if "lora_B" in k}
    assert any(not adapters[4][k].equal(adapters[12][k]) for k in adapters[4])  # each checkpoint its own step's
    final = load_file(str(job_dir / "run" / "adapter" / "adapter_model.safetensors"))
    assert all(final[k].equal(v) for k, v in load_file(checkpoints[-1].path + "/adapter/adapter_model.safetensors").items())

    result = _result(job_dir)
    assert result.status == "succeeded" and result.fine_tuned_model == "ft:tiny:tunesmith::ftjob-supervised"
    assert result.trained_tokens == metrics[-1]["trained_tokens"]
    monkeypatch.setenv("TUNESMITH_HOME", str(home))
    assert Registry().resolve(result.registry_reference) == ("ftjob-supervised", "1")
    tags = Registry().client.get_model_version("ftjob-supervised", "1").tags
    assert tags["tunesmith.fine_tuned_model"] == result.fine_tuned_model
    assert json.loads(tags["tunesmith.hyperparameters"])["n_epochs"] == EPOCHS
    assert tags["tunesmith.training_file_sha256"] == file_sha256(Path(JobFolder(job_dir).spec().training_file))
    step_metrics = Path(result.result_files[0])
    with step_metrics.open(encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]
    assert [int(row[0]) for row in rows[1:]] == list(range(1, 13))
    assert all(Path(path).is_file() for path in result.result_files)


def test_sigterm_saves_a_checkpoint_without_a_result_and_a_rerun_resumes_to_the_same_losses(
        finished_job, tmp_path, tiny_model_dir, monkeypatch):
    rows = write_jsonl(tmp_path / "orders.jsonl", order_rows(ROWS))
    job_dir = _job(tmp_path, tiny_model_dir, "ftjob-stopped", rows)
    report_step = TrainingReporter.on_step

    def sigterm_after_step_6(reporter, progress, total_steps):
        report_step(reporter, progress, total_steps)
        if progress.step == 6:
            os.kill(os.getpid(), signal.SIGTERM)  # what the supervisor sends to pause or cancel

    with monkeypatch.context() as patch:
        patch.setattr(TrainingReporter, "on_step", sigterm_after_step_6)
        assert main([str(job_dir)]) == 143
    assert not (job_dir / "result.json").exists()
    assert [c.step_number for c in _checkpoints(job_dir)] == [4, 6]  # the epoch's, and the one the stop saved

    assert main([str(job_dir)]) == 0
    assert "Fine-tuning job resumed from the checkpoint at step 6" in [e.message for e in _events(job_dir)]
    assert [e.data["step"] for e in _events(job_dir) if e.type == "metrics"] == list(range(1, 13))
    resumed, uninterrupted = _loss_curve(job_dir), _loss_curve(finished_job[0])
    assert [p["step"] for p in resumed] == [p["step"] for p in uninterrupted]
    assert resumed[-1]["loss"] == pytest.approx(uninterrupted[-1]["loss"], rel=1e-5)
    assert _result(job_dir).status == "succeeded"


def test_a_dpo_job_in_openai_dpo_format_succeeds(tmp_path, tiny_model_dir):
    rows = []
    for row in order_rows(12):
        user, answer = row["messages"]
        rows.append({"input": {"messages": [user]}, "preferred_output": [answer],
                     "non_preferred_output": [{"role": "assistant", "content": f"No. ({user['content']})"}]})
    job_dir = _job(tmp_path, tiny_model_dir, "ftjob-dpo", write_jsonl(tmp_path / "pairs.jsonl", rows),
                   method="dpo", n_epochs=1, beta=0.2)
    assert main([str(job_dir)]) == 0
    result = _result(job_dir)
    assert result.status == "succeeded" and result.registry_reference == "ftjob-dpo@1"
    # Each step reported once, as it ended (before the finished model became the last checkpoint).
    events = _events(job_dir)
    steps = [e.data["step"] for e in events if e.type == "metrics"]
    manifest = json.loads((job_dir / "run" / "manifest.json").read_text())
    assert steps == list(range(1, int(manifest["train"]["metrics"]["steps"]) + 1))
    last_metrics = max(i for i, e in enumerate(events) if e.type == "metrics")
    assert last_metrics < next(i for i, e in enumerate(events) if "Checkpoint created" in e.message)
    assert manifest["train"]["config"]["preference"]["beta"] == 0.2
    assert Path(_checkpoints(job_dir)[-1].path, "adapter", "adapter_config.json").is_file()


def test_a_broken_training_file_fails_naming_its_lines_before_anything_trains(tmp_path, tiny_model_dir):
    good = [json.dumps(row) for row in order_rows(12)]
    lines = good[:2] + ['{"messages": [{"role": "user", "content": "hi"}'] + good[2:3]
    lines += ['{"messages": [{"content": "hi"}, {"role": "assistant", "content": "yo"}]}'] + good[3:]
    upload = tmp_path / "file-abc123"  # uploads keep no .jsonl suffix
    upload.write_text("\n".join(lines) + "\n", encoding="utf-8")
    job_dir = _job(tmp_path, tiny_model_dir, "ftjob-broken", upload)
    done = subprocess.run([sys.executable, "-m", "tunesmith.jobs.runner", str(job_dir)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    error = _result(job_dir).error
    assert error.code == "invalid_training_file" and error.param == "training_file"
    assert "line 3: not valid JSON" in error.message and "line 5: messages[0].role: missing" in error.message
    assert str(tmp_path) not in error.message
    assert not (job_dir / "run").exists() and _events(job_dir)[-1].level == "error"


def test_sigterm_before_training_exits_143_without_a_result(tmp_path, tiny_model_dir, monkeypatch):
    import tunesmith.data.prepare

    def terminated_while_preparing(config, overwrite=False):
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(tunesmith.data.prepare, "prepare", terminated_while_preparing)
    handler = signal.getsignal(signal.SIGTERM)
    job_dir = _job(tmp_path, tiny_model_dir, "ftjob-early", write_jsonl(tmp_path / "orders.jsonl", order_rows(12)))
    assert main([str(job_dir)]) == 143
    assert not (job_dir / "result.json").exists() and signal.getsignal(signal.SIGTERM) is handler


def test_an_unexpected_error_fails_the_job_with_one_line_and_a_traceback_on_stderr(tmp_path, tiny_model_dir,
                                                                                     monkeypatch, capsys):
    import tunesmith.jobs.config_mapping

    def broken(*args, **kwargs):
        raise RuntimeError("mapping broke\non two lines")

    monkeypatch.setattr(tunesmith.jobs.config_mapping, "run_config_for", broken)
    job_dir = _job(tmp_path, tiny_model_dir, "ftjob-bug", write_jsonl(tmp_path / "orders.jsonl", order_rows(12)))
    assert main([str(job_dir)]) == 1
    error = _result(job_dir).error
    assert (error.code, error.message) == ("training_failed", "RuntimeError: mapping broke on two lines")
    assert "Traceback" in capsys.readouterr().err


def test_too_few_examples_and_bad_hyperparameters_fail_with_openai_codes(tmp_path, tiny_model_dir):
    few = _job(tmp_path, tiny_model_dir, "ftjob-few", write_jsonl(tmp_path / "few.jsonl", order_rows(9)))
    assert main([str(few)]) == 1
    assert _result(few).error.code == "invalid_training_file" and "at least 10" in _result(few).error.message

    rows = write_jsonl(tmp_path / "orders.jsonl", order_rows(12))
    for job_id, hyperparameters, param in (("ftjob-epochs", {"n_epochs": 0}, "hyperparameters.n_epochs"),
                                           ("ftjob-beta", {"beta": 0.5}, "hyperparameters.beta")):
        job_dir = _job(tmp_path, tiny_model_dir, job_id, rows, **hyperparameters)
        assert main([str(job_dir)]) == 1
        error = _result(job_dir).error
        assert (error.code, error.param) == ("invalid_hyperparameters", param) and not (job_dir / "run").exists()


def test_the_learning_rate_multiplier_scales_tunesmiths_default_for_the_base(tmp_path, tiny_model_dir):
    from transformers import AutoConfig

    from tunesmith.jobs.config_mapping import run_config_for
    from tunesmith.train.learning_rate import default_learning_rate

    rows = write_jsonl(tmp_path / "orders.jsonl", order_rows(12))
    spec = JobFolder(_job(tmp_path, tiny_model_dir, "ftjob-lr", rows, learning_rate_multiplier=0.5)).spec()
    config = run_config_for(spec, tmp_path)
    default = default_learning_rate(AutoConfig.from_pretrained(tiny_model_dir), "lora", "sft")
    assert config.train.learning_rate == pytest.approx(0.5 * default)
    assert (config.train.epochs, config.train.batch_size, config.seed) == (EPOCHS, BATCH, SEED)
    assert config.run_dir == tmp_path / "run" and config.data.format == "chat"


def test_an_empty_training_file_fails_saying_so_without_a_blank_line_number(tmp_path, tiny_model_dir):
    upload = tmp_path / "file-empty"
    upload.write_text("", encoding="utf-8")
    job_dir = _job(tmp_path, tiny_model_dir, "ftjob-empty", upload)
    assert main([str(job_dir)]) == 1
    error = _result(job_dir).error
    assert error.code == "invalid_training_file"
    assert error.message.startswith("the training file: no examples found (the file is empty)"), error.message
