"""`python -m tunesmith.jobs.runner JOB_DIR`: one OpenAI-style fine-tuning job, start to finish, in its own process.

Read top to bottom: check the files -> map the settings -> prepare -> train (SFT or DPO, resuming from the newest
checkpoint of an earlier attempt) -> evaluate against the base -> register -> result.json. The job folder's files
are described in jobs.records. Exit codes: 0 succeeded, 1 failed (result.json says why), 143 stopped by SIGTERM
(after saving a checkpoint when it came during training; no result.json), 130 Ctrl-C likewise, 2 the job folder is
unusable.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path

from tunesmith.errors import TunesmithError
from tunesmith.jobs.job_folder import JobFailed, JobFolder
from tunesmith.jobs.records import JobError, JobResult, JobSpec

EXIT_FAILED, EXIT_UNUSABLE, EXIT_SIGTERM, EXIT_SIGINT = 1, 2, 143, 130


class Terminated(BaseException):
    """SIGTERM outside the training loop (which saves a checkpoint first): stop at once, write no result."""


def main(argv: list[str] | None = None) -> int:
    """Run the job in the folder named by the only argument; returns the exit code."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m tunesmith.jobs.runner JOB_DIR", file=sys.stderr)
        return EXIT_UNUSABLE
    folder = JobFolder(Path(args[0]))
    try:
        spec = folder.spec()
    except (OSError, ValueError) as exc:
        print(f"{folder.directory}: no readable job.json ({_one_line(exc)}); the supervisor writes it before "
              "starting the runner", file=sys.stderr)
        return EXIT_UNUSABLE
    with _sigterm_raises():
        return _run_to_the_end(spec, folder)


def _run_to_the_end(spec: JobSpec, folder: JobFolder) -> int:
    """The job's result written (success or a failure a client can read), or the exit code of a stop."""
    from tunesmith.train.loop import TrainingStopped

    try:
        result = run_job(spec, folder)
    except (TrainingStopped, Terminated) as stop:
        where = f" at step {stop.step}, checkpoint {stop.checkpoint}" if isinstance(stop, TrainingStopped) else ""
        print(f"{spec.job_id}: stopped{where}; starting the runner again resumes", file=sys.stderr)
        interrupted = isinstance(stop, TrainingStopped) and stop.signal_name == "SIGINT"
        return EXIT_SIGINT if interrupted else EXIT_SIGTERM
    except JobFailed as failed:
        result = JobResult(status="failed", error=failed.error)
    except TunesmithError as exc:  # a clear message already (a missing base model, a NaN loss, ...)
        result = _failed(_one_line(exc))
    except Exception as exc:  # noqa: BLE001 - our bug: the traceback goes to stderr, the client gets one line
        traceback.print_exc()
        result = _failed(f"{type(exc).__name__}: {_one_line(exc)}")
    if result.error is not None:
        folder.event(f"Fine-tuning job failed: {result.error.message}", level="error")
    else:
        folder.event("The job has successfully completed")
    folder.finish(result)
    return 0 if result.status == "succeeded" else EXIT_FAILED


def run_job(spec: JobSpec, folder: JobFolder) -> JobResult:
    """Every stage of the job; raises JobFailed for a problem the client can fix."""
    from tunesmith.config import load_run_config
    from tunesmith.evaluate.run import evaluate_run
    from tunesmith.jobs.config_mapping import with_epoch_checkpoints
    from tunesmith.jobs.training_reports import write_step_metrics
    from tunesmith.registry.run import EVAL_REPORT, Run
    from tunesmith.registry.run_dir import MANIFEST

    run_dir = folder.run_dir
    prepared_now = not (run_dir / MANIFEST).is_file()
    config = _prepared(spec, folder) if prepared_now else load_run_config(run_dir)
    config = with_epoch_checkpoints(config, Run.open(run_dir).manifest.data.rows["train"])
    if not Run.open(run_dir).is_trained:
        _train(spec, folder, config, prepared_now)
    run = Run.open(run_dir)
    folder.event("New fine-tuned model created")

    folder.event("Evaluating the fine-tuned model against the base model on the validation examples")
    report = evaluate_run(run_dir, config)
    folder.event(_evaluation_summary(report))
    reference = _register(spec, folder)
    folder.event(f"Registered as {reference}, served as {spec.fine_tuned_model}")
    eval_report = run_dir / EVAL_REPORT
    return JobResult(status="succeeded", fine_tuned_model=spec.fine_tuned_model, registry_reference=reference,
                     trained_tokens=run.trained.metrics.get("tokens_seen"),
                     result_files=[str(write_step_metrics(run.trained, folder.directory).resolve()),
                                   str(eval_report.resolve()), str(eval_report.with_suffix(".html").resolve())])


def _prepared(spec: JobSpec, folder: JobFolder):
    """Files checked, settings mapped, the run directory prepared (data split, card, pre-flight check)."""
    from tunesmith.data.prepare import prepare
    from tunesmith.jobs.config_mapping import run_config_for
    from tunesmith.jobs.training_files import checked_files, data_problem
    from tunesmith.models import resolve_base_model

    folder.event("Validating training file")
    training, validation = checked_files(spec, folder.directory)
    config = run_config_for(spec, folder.directory, training, validation)
    resolve_base_model(config.base_model)  # a missing base model is not a problem of the files
    try:
        prepare(config)
    except TunesmithError as exc:  # the rows are fine one by one; the set is not (too few to split, pre-flight)
        raise data_problem(exc) from None
    folder.event("Files validated")
    return config


def _train(spec: JobSpec, folder: JobFolder, config, prepared_now: bool) -> None:
    """Train with the method's trainer, reporting steps and checkpoints; the finished model is the last checkpoint."""
    from tunesmith.jobs.checkpoint_export import CheckpointExporter
    from tunesmith.jobs.training_reports import TrainingReporter
    from tunesmith.registry.run import Run

    run_dir = folder.run_dir
    exporter = CheckpointExporter(Run.open(run_dir).base_source, config.train)
    reporter = TrainingReporter(folder, spec.fine_tuned_model, exporter)
    _train_resuming(folder, config, reporter, prepared_now)
    reporter.report_trained(Run.open(run_dir).trained, run_dir)


def _train_resuming(folder: JobFolder, config, reporter, prepared_now: bool) -> None:
    """SFT or DPO, continued from the newest intact checkpoint an earlier attempt of the job saved."""
    from tunesmith.train.checkpoints import newest_intact_checkpoint
    from tunesmith.train.loop import TrainingStopped
    from tunesmith.train.preference import train_preference
    from tunesmith.train.sft import train_sft

    checkpoint, _ = newest_intact_checkpoint(folder.run_dir)
    if checkpoint is not None:
        folder.event(f"Fine-tuning job resumed from the checkpoint at step {int(checkpoint.name.split('-')[1])}")
    else:
        folder.event("Fine-tuning job started" if prepared_now else
                     "Fine-tuning job started again from step 0 (no checkpoint was saved before it stopped)")
    # SFT's loop and TRL's trainer (on the same footing) both report each step as it ends: metrics live, checkpoints
    train = train_sft if config.train.method == "sft" else train_preference
    try:
        train(folder.run_dir, config, resume=checkpoint is not None, restart=checkpoint is None,
              on_step=reporter.on_step)
    except TrainingStopped:  # the stop saved one more checkpoint, as loadable as the others
        reporter.report_new_checkpoints()
        raise


def _register(spec: JobSpec, folder: JobFolder) -> str:
    """Register the run as a version of the model named by the job id; the job's facts go into version tags."""
    from tunesmith.registry.hashing import file_sha256
    from tunesmith.registry.register import register_run
    from tunesmith.registry.store import Registry

    registry = Registry()
    info, _ = register_run(registry, folder.run_dir, spec.job_id)  # `ft:...` names hold ':', which MLflow refuses
    tags = {"tunesmith.job_id": spec.job_id, "tunesmith.fine_tuned_model": spec.fine_tuned_model,
            "tunesmith.method": spec.method, "tunesmith.hyperparameters": spec.hyperparameters.model_dump_json()}
    for param in ("training_file", "validation_file"):
        upload = getattr(spec, param)
        if upload and Path(upload).is_file():  # a client may delete an upload once its job has started
            tags[f"tunesmith.{param}_sha256"] = file_sha256(Path(upload))
    with registry.errors():
        for key, value in tags.items():
            registry.client.set_model_version_tag(info.model, info.version, key, value)
    return f"{info.model}@{info.version}"


def _evaluation_summary(report: dict) -> str:
    """`Evaluated on 12 validation examples: validation loss 0.8123 (base 2.3456)`."""
    from tunesmith.evaluate.contenders import BASE, FINE_TUNED

    losses = {label: scores.get("validation_loss") for label, scores in report["results"].items()}
    base = f" (base {losses[BASE]:.4f})" if losses.get(BASE) is not None else ""
    return f"Evaluated on {report['examples']} validation example(s): validation loss {losses[FINE_TUNED]:.4f}{base}"


def _failed(message: str) -> JobResult:
    return JobResult(status="failed", error=JobError(code="training_failed", message=message))


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


@contextmanager
def _sigterm_raises():
    """SIGTERM raises Terminated (the SFT loop installs its own handler while it trains, and saves first)."""

    def handle(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
