"""A job's uploaded files checked by the data stage before anything trains, with OpenAI's error codes."""

from __future__ import annotations

import os
import re
from pathlib import Path

from tunesmith.data.formats import read_examples
from tunesmith.errors import TunesmithError
from tunesmith.jobs.config_mapping import DATA_FORMAT
from tunesmith.jobs.job_folder import JobFailed
from tunesmith.jobs.records import JobSpec

MIN_TRAINING_EXAMPLES = 10  # OpenAI's minimum
INPUTS_DIR = "inputs"


def checked_files(spec: JobSpec, job_dir: Path) -> tuple[Path, Path | None]:
    """The training (and validation) file as JSONL paths the data stage reads, after every row was checked.

    A bad row is `invalid_training_file` / `invalid_validation_file` naming its lines; so are fewer than 10 examples."""
    fmt = DATA_FORMAT[spec.method]
    training = staged_as_jsonl(Path(spec.training_file), Path(job_dir), "training_file")
    count = len(_examples(training, fmt, "training_file"))
    if count < MIN_TRAINING_EXAMPLES:
        raise JobFailed("invalid_training_file", f"the training file has {count} example(s); fine-tuning needs at "
                        f"least {MIN_TRAINING_EXAMPLES}: add examples", "training_file")
    if not spec.validation_file:
        return training, None
    validation = staged_as_jsonl(Path(spec.validation_file), Path(job_dir), "validation_file")
    _examples(validation, fmt, "validation_file")
    return training, validation


def data_problem(exc: TunesmithError, param: str = "training_file") -> JobFailed:
    """A data-stage error about the job's files as the job error a client sees."""
    return JobFailed(f"invalid_{param}", " ".join(str(exc).split()), param)


def staged_as_jsonl(upload: Path, job_dir: Path, param: str) -> Path:
    """The upload itself when it is named .jsonl, else a `.jsonl` link to it (the data stage reads by suffix)."""
    if upload.suffix.lower() == ".jsonl":
        return upload
    link = job_dir / INPUTS_DIR / f"{param}.jsonl"
    if not link.is_symlink():
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(upload.resolve(), link)
    return link


def _examples(path: Path, fmt: str, param: str) -> list:
    try:
        return read_examples(path, fmt)
    except TunesmithError as exc:
        raise JobFailed(f"invalid_{param}", _lines_named(str(exc), path, param.replace("_", " ")), param) from None


def _lines_named(message: str, path: Path, what: str) -> str:
    """The data stage's report (`PATH:LINE: problem` per line) as one line that names lines of `what`."""
    message = message.replace(f"in {path}:", f"in the {what}:")
    message = re.sub(re.escape(str(path)) + r":(?=\d)", "line ", message)  # PATH:12: ... -> line 12: ...
    first, *problems = message.replace(str(path), f"the {what}").split("\n")
    return " ".join([first, "; ".join(problem.strip() for problem in problems)]).strip()
