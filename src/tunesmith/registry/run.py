"""`Run`: the one object through which stages read a run directory and record what they did."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from tunesmith.errors import TunesmithError
from tunesmith.records import MANIFEST_VERSION, EvaluationReport, Manifest, ParentRef, TrainSection
from tunesmith.registry.run_dir import MANIFEST, environment, read_json, write_json_atomic

EVAL_REPORT = "eval/report.json"


class Run:
    """A run directory and its typed manifest: where the weights are, which template it was made with, its lineage."""

    def __init__(self, directory: Path, manifest: Manifest):
        self.directory = Path(directory)
        self.manifest = manifest

    @classmethod
    def open(cls, directory: Path | str) -> Run:
        directory = Path(directory)
        if not (directory / MANIFEST).is_file():
            raise TunesmithError(f"{directory} is not a tunesmith run directory (no {MANIFEST}); "
                                 "run `tunesmith prepare CONFIG` first")
        return cls(directory, load_manifest(directory / MANIFEST))

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def base_source(self) -> str:
        """What the base model loads from (a folder or a Hub id)."""
        return self.manifest.base_model.source

    @property
    def data_kind(self) -> str:
        return self.manifest.data.kind

    @property
    def is_trained(self) -> bool:
        return self.manifest.train is not None

    @property
    def trained(self) -> TrainSection:
        if self.manifest.train is None:
            raise TunesmithError(f"{self.directory} has not been trained yet; run `tunesmith train {self.directory}` first")
        return self.manifest.train

    @property
    def weights_dir(self) -> Path:
        """Where the run keeps what it learned: its adapter folder, or its full model for full fine-tuning."""
        return self.directory / self.trained.weights_subdir

    @property
    def is_full_fine_tune(self) -> bool:
        return self.trained.full_fine_tune

    def verify_weights(self) -> str:
        """The trained weights' hash, checked against the one training recorded: a file changed, truncated or
        replaced since then is refused before anything loads it."""
        from tunesmith.registry.hashing import folder_sha256

        recorded = self.trained.weights_sha256
        if not self.weights_dir.is_dir():
            raise TunesmithError(f"{self.weights_dir} is missing; re-run `tunesmith train {self.directory}`")
        actual = folder_sha256(self.weights_dir)
        if recorded and actual != recorded:
            raise TunesmithError(f"{self.weights_dir} changed after training (its hash no longer matches the "
                                 "manifest's train.weights_sha256); restore it or re-run `tunesmith train`")
        return actual

    def check_template(self, tokenizer, whose: str = "the base model") -> None:
        """Training, evaluation and serving must use the chat template the data was prepared with."""
        from tunesmith.data.template import template_fingerprint

        if template_fingerprint(tokenizer) != self.manifest.data.chat_template_sha:
            raise TunesmithError(f"{self.directory}: the chat template of {whose} differs from the one the data was "
                                 "prepared with; re-run `tunesmith prepare` (and `tunesmith train`) for this run")

    def record(self, section: str, data: dict) -> None:
        """Set one stage's section of the manifest: checked against the contract, then written atomically."""
        path = self.directory / MANIFEST
        raw = read_json(path) if path.is_file() else self.manifest.model_dump(mode="json", exclude_none=True)
        raw[section] = data
        raw["version"] = MANIFEST_VERSION
        raw.setdefault("environment", environment())
        self.manifest = Manifest.model_validate(raw)  # our bug if this fails, so it is not caught
        write_json_atomic(path, raw)

    def config_dict(self) -> dict:
        """The resolved config the run was prepared with (`config.yaml`), as a plain dict."""
        import yaml

        path = self.directory / "config.yaml"
        return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.is_file() else {}

    def evaluation_report(self) -> EvaluationReport:
        path = self.directory / EVAL_REPORT
        if not path.is_file():
            raise TunesmithError(f"{self.directory} has not been evaluated yet; run `tunesmith evaluate {self.directory}`")
        return _validated(EvaluationReport, read_json(path), path)

    def as_parent(self) -> ParentRef:
        """This run as recorded in the lineage of a run that continued from it."""
        return ParentRef(run_dir=str(self.directory.resolve()), name=self.name, method=self.trained.method,
                         data_hash=self.trained.data_hash)

    def check_continuable_by(self, child: Run, full_fine_tune: bool) -> None:
        """`child` may start from this run (`train.init_from`): trained, on the same base, with the same kind of weights."""
        trained = self.manifest.train
        if trained is None:
            raise TunesmithError(f"train.init_from: {self.directory} has not been trained yet; "
                                 f"run `tunesmith train {self.directory}`")
        if self.base_source != child.base_source:
            raise TunesmithError(f"train.init_from: {self.directory} was trained on {self.base_source}, "
                                 f"this run uses {child.base_source}; continue only from the same base")
        if trained.full_fine_tune != full_fine_tune:
            wanted = "full" if trained.full_fine_tune else trained.adapter
            raise TunesmithError(f"train.init_from: {self.directory} trained "
                                 f"{'all weights' if trained.full_fine_tune else 'an adapter'}; "
                                 f"set train.adapter={wanted} to continue it")


def load_manifest(path: Path) -> Manifest:
    """A manifest of this layout or an older one; anything else is one clear message."""
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise TunesmithError(f"{path}: not a run manifest (expected a JSON object); re-run `tunesmith prepare`")
    if int(raw.get("version", 1) or 1) > MANIFEST_VERSION:
        raise TunesmithError(f"{path}: written by a newer tunesmith (manifest version {raw['version']}, this one reads "
                             f"up to {MANIFEST_VERSION}); upgrade tunesmith")
    return _validated(Manifest, raw, path)


def write_manifest(path: Path, manifest: Manifest) -> None:
    write_json_atomic(path, manifest.model_dump(mode="json", exclude_none=True))


def _validated(record_type, raw: dict, path: Path):
    try:
        return record_type.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "(top)"
        raise TunesmithError(f"{path}: {where}: {error['msg']}; the file was edited or written by an incompatible "
                             "tunesmith; re-run the stage that wrote it") from None

