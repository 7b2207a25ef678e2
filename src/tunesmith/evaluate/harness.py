"""lm-evaluation-harness tasks on a tunesmith model (base or adapter), with task definitions from local files.

The harness is an optional extra (`pip install 'tunesmith[harness]'`); tasks come from the YAML files in
`evaluate.harness.include_path`, whose `dataset_kwargs.data_files` point at local files, so no hub is reached.
"""

from __future__ import annotations

import os

from tunesmith.config import HarnessConfig
from tunesmith.errors import TunesmithError


def harness_task_manager(settings: HarnessConfig):
    """lm-eval's TaskManager over the configured local task folder, after checking every task exists."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise TunesmithError("evaluate.harness.tasks needs lm-evaluation-harness: pip install 'tunesmith[harness]'") from None
    if settings.include_path is not None and not settings.include_path.is_dir():
        raise TunesmithError(f"evaluate.harness.include_path {settings.include_path}: no such folder of task YAML files")
    manager = TaskManager(include_path=str(settings.include_path) if settings.include_path else None,
                          include_defaults=settings.include_path is None)
    missing = [task for task in settings.tasks if task not in manager.all_tasks]
    if missing:
        where = settings.include_path or "lm-eval's built-in tasks"
        raise TunesmithError(f"evaluate.harness.tasks: {', '.join(missing)} not found in {where}; "
                             "define them as YAML files there with local data files")
    return manager


def run_harness(model, tokenizer, settings: HarnessConfig, task_manager, batch_size: int) -> dict[str, float]:
    """Scores of the configured tasks on an already loaded model, as `harness:<task>:<metric>` -> value."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))
    output = simple_evaluate(model=lm, tasks=list(settings.tasks), task_manager=task_manager, limit=settings.limit,
                             num_fewshot=settings.num_fewshot, log_samples=False, bootstrap_iters=0,
                             verbosity="ERROR")
    scores = {}
    for task, metrics in output["results"].items():
        for key, value in metrics.items():
            name = key.split(",")[0]
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not name.endswith("_stderr"):
                scores[f"harness:{task}:{name}"] = float(value)
    return scores
