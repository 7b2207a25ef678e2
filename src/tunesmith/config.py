"""Typed configuration for every stage, YAML loading and `a.b=c` command-line overrides.

Each option is documented once, in the attribute docstring under it; `tunesmith options` and
docs/config.md are generated from these docstrings.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tunesmith.errors import TunesmithError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


DataFormat = Literal["auto", "chat", "prompt_completion", "alpaca", "sharegpt", "preference", "openai_dpo", "unpaired"]


class DataSourceConfig(_Section):
    path: Path
    """Data file (.jsonl, .json, .csv, .parquet) or saved Hugging Face dataset folder mixed into the pool."""
    weight: float = Field(1.0, gt=0)
    """Share of this source's rows in the training split: 2 repeats each row, 0.5 keeps half (chosen by content hash)."""


class ReplayConfig(_Section):
    share: float = Field(0.25, ge=0, le=1)
    """Replay rows added to SFT training, as a share of the training split's rows (0.25: one per four task rows; answers cut by `max_new_tokens` are left out, so fewer may remain); 0: off. On the quickstart, 0.25 kept general questions within 0.3 points of the base where plain LoRA lost 7.5 (bench/forgetting_ablation.py)."""
    source: Literal["self_distill"] | Path = "self_distill"
    """`self_distill`: the base model's own answers to tunesmith's shipped general prompts (generated once, cached per base model); or a chat data file of your own general examples."""
    max_new_tokens: int = Field(128, ge=1)
    """Longest self-distilled answer; longer ones are cut and dropped."""


class DataConfig(_Section):
    train: Path
    """Training data: .jsonl, .json, .csv, .parquet or a saved Hugging Face dataset folder, in any supported format."""
    validation: Path | None = None
    """Optional file of held-out examples; when absent, a slice of the pool is held out by content hash."""
    sources: list[DataSourceConfig] = []
    """More files mixed into the pool with `train`, each with its own weight."""
    format: DataFormat = "auto"
    """Input format; `auto` detects it per file (mixed or ambiguous files are errors that name the lines)."""
    mode: Literal["strict", "lenient"] = "strict"
    """`strict` stops on the first kind of bad row, naming its lines; `lenient` drops bad rows and says why (data/dropped.jsonl)."""
    clean: bool = True
    """Normalize Unicode (NFC), line endings, control characters and surrounding whitespace in every text field."""
    dedup: Literal["near", "exact", "off"] = "near"
    """Drop duplicates, keeping one per cluster: `exact` (same normalized text), `near` (MinHash LSH, plus exact), `off`."""
    near_duplicate_threshold: float = Field(0.8, gt=0, le=1)
    """Estimated Jaccard similarity of word 3-grams at which two rows count as near duplicates."""
    minhash_permutations: int = Field(128, ge=1)
    """MinHash signature length: more estimates similarity more precisely and costs memory (4 bytes each per row). At a million ~200-token rows, 128 found 95.5% of duplicates that differ in 2 of 70 words (64: 91.1%) in the same time, 1.85 GiB peak."""
    leakage: Literal["remove", "flag"] = "remove"
    """Held-out rows that (nearly) duplicate a training row: `remove` them, or only `flag` them in the report."""
    stratify_by: str | None = None
    """Record field (such as `label`) whose values each get the validation fraction when splitting."""
    redact_pii: bool = False
    """Replace emails, phone numbers, card numbers (Luhn-checked), IP addresses and API keys/secrets with [KIND]."""
    benchmark_files: list[Path] = []
    """Benchmark files that must not overlap the training data; the pre-flight check fails if they do."""
    num_proc: int | None = Field(None, ge=1)
    """Worker processes for parsing, cleaning and hashing; default: all cores for inputs over 20 MB, else one."""
    token_stats_rows: int = Field(5000, ge=1)
    """Token statistics are exact up to this many rows per split, estimated from a content-hash sample above it."""
    preflight_examples: int = Field(3, ge=0)
    """Training examples rendered and mask-checked by the pre-flight check."""
    validation_fraction: float = 0.15
    """Share of examples held out for validation when no `validation` file is given (0 < x < 1)."""
    max_length: int = Field(1024, ge=1)
    """Longest tokenized example (prompt + answer) kept for training; longer ones are truncated from the end."""
    system_prompt: str | None = None
    """System message prepended to examples that have none (prompt/completion and alpaca rows included)."""
    replay: ReplayConfig = ReplayConfig()
    """Replay of general data mixed into SFT training so the model keeps what it could already do."""


class LoraConfig(_Section):
    r: int = Field(16, ge=1)
    """LoRA rank."""
    alpha: int = Field(32, ge=1)
    """LoRA scaling numerator (effective scale is alpha / r)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the LoRA input; 0 is fastest and fine for small datasets."""
    target_modules: str | list[str] = "all-linear"
    """Modules that get adapters: `all-linear` or a list of module names such as [q_proj, v_proj]."""
    rslora: bool = False
    """Rank-stabilized LoRA: scale by alpha / sqrt(r) instead of alpha / r (keeps high ranks learning)."""


class PreferenceConfig(_Section):
    beta: float = Field(0.1, gt=0)
    """DPO/KTO beta: how far the policy may move from the reference (higher stays closer); the reference is the base model, or the `train.init_from` run's model."""
    sft_weight: float = Field(0.0, ge=0)
    """DPO only: weight of a negative log-likelihood (SFT) loss on the chosen answers added to DPO's (RPO); 1.0 keeps the chosen answers likely where pairs differ in a few tokens and plain DPO lowers both (0: plain DPO)."""


class GrpoConfig(_Section):
    rewards: list[str] = ["json_valid"]
    """Reward functions, summed: shipped `json_valid`, `json_schema`, `exact_match`, `field_match`, `regex`, `length`, or your own `path/to/file.py:name` / `module:name` called as name(completion, reference) -> number."""
    reward_weights: list[float] | None = None
    """Weight of each reward (same order as `rewards`); unset: 1 each."""
    num_generations: int = Field(4, ge=2)
    """Answers sampled per prompt; each is rewarded relative to its group's mean."""
    max_completion_length: int = Field(64, ge=1)
    """Longest sampled answer, in tokens."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of the answers."""
    beta: float = Field(0.0, ge=0)
    """KL penalty toward the reference model (0: none, TRL's default; no reference copy is kept)."""
    json_schema: Path | None = None
    """JSON schema file for the `json_schema` reward."""
    regex: str | None = None
    """Regular expression the whole answer must match, for the `regex` reward."""
    target_length: int | None = Field(None, ge=1)
    """Answer length in characters the `length` reward prefers (1 at it, falling linearly to 0 at twice it); unset: the reference's length."""


class TrainConfig(_Section):
    method: Literal["sft", "dpo", "kto", "grpo"] = "sft"
    """`sft` on chat examples; preference tuning on chosen/rejected pairs: `dpo`, or `kto` (also takes unpaired labels); or `grpo` on chat examples, rewarding sampled answers with `train.grpo.rewards` (the dataset's answers serve as references)."""
    epochs: float = Field(2.0, gt=0)
    """Passes over the training split."""
    adapter: Literal["lora", "dora", "qlora", "full"] = "lora"
    """What SFT trains: a LoRA adapter, DoRA (weight-decomposed LoRA), QLoRA (LoRA on a 4-bit NF4 base; CUDA + bitsandbytes only), or every weight (`full`)."""
    learning_rate: float | None = Field(None, gt=0)
    """Peak learning rate (AdamW), reached after warmup, then decayed by `lr_scheduler`. Unset: chosen from the model's width (SFT: 5e-5 x 10 for adapters x (2000 / hidden_size) ** 0.781, 1.3e-3 for the default model's LoRA; preference tuning: 2e-4 adapters, 2e-5 full) and recorded in the manifest."""
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    """Learning-rate decay after warmup: to zero linearly, along a cosine, or not at all."""
    batch_size: int = Field(8, ge=1)
    """Examples per optimizer step across all processes, per micro-batch (the global batch is batch_size x grad_accum)."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches accumulated per optimizer step."""
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    """Share of steps spent warming the learning rate up from zero."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the gradient norm to this value before each optimizer step; unset: no clipping."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """`auto` uses bf16 autocast where the CPU/GPU supports it, else fp32; `fp16` (CUDA only) adds loss scaling."""
    attention: Literal["auto", "model"] = "auto"
    """`auto`: training on CPU uses tunesmith's grouped-GEMM attention (PyTorch's CPU SDPA kernel is slow on short bf16 sequences; same results); on GPU, and with `model`, the model's own attention (SDPA / flash)."""
    packing: bool = False
    """Padding-free batches: a micro-batch's examples are concatenated into one row whose position ids restart per example, so no example attends to another. Off by default: on CPU the attention kernels compute the whole packed row, and padded micro-batches of length-sorted examples measured faster (513 vs 389 tokens/s on the quickstart); turn on for data of very mixed lengths."""
    group_by_length: bool = True
    """SFT: examples of similar length share an optimizer step (within random groups of 50 steps, as transformers' `group_by_length`), so padded micro-batches carry little padding; the order is still random and fixed by the seed. Off: each step draws examples uniformly."""
    gradient_checkpointing: bool = False
    """Recompute activations during the backward pass: less memory, about a third slower."""
    compile: bool = False
    """Compile the model with `torch.compile` (minutes of warm-up; pays off only on long runs)."""
    max_steps: int | None = Field(None, ge=0)
    """Stop after this many optimizer steps (overrides `epochs`; 0 or unset: `epochs` decides); handy for smoke tests."""
    logging_steps: int = Field(5, ge=1)
    """Record the training loss every N optimizer steps."""
    eval_steps: int | None = Field(None, ge=1)
    """Validation loss every N optimizer steps (recorded as the validation curve); default: four times per run."""
    early_stopping_patience: int | None = Field(None, ge=1)
    """Stop when validation loss has not improved for this many evaluations in a row; unset: never stop early."""
    checkpoint_steps: int = Field(50, ge=0)
    """Write a resumable checkpoint every N optimizer steps (0: only when stopped by SIGTERM)."""
    keep_checkpoints: int = Field(2, ge=1)
    """Complete checkpoints kept; older ones are deleted."""
    init_from: Path | None = None
    """Earlier run directory whose trained adapter (or fully tuned model) this run continues from; recorded as its parent."""
    threads: int | None = Field(None, ge=1)
    """CPU threads for PyTorch; default: every core this process may use."""
    distributed: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    """How several processes (`tunesmith train --nproc N`) share the work: data parallel, FSDP full sharding, or DeepSpeed ZeRO (GPU clusters)."""
    deepspeed_config: Path | None = None
    """DeepSpeed JSON config (ZeRO stage, offload) for `distributed: deepspeed`; unset: ZeRO-2 with accelerate's defaults."""
    lora: LoraConfig = LoraConfig()
    """LoRA adapter settings."""
    preference: PreferenceConfig = PreferenceConfig()
    """Preference tuning settings (methods `dpo` and `kto`)."""
    grpo: GrpoConfig = GrpoConfig()
    """GRPO settings (method `grpo`): rewards and sampling."""


DEFAULT_JUDGE_RUBRIC = ("Which answer follows the instruction better? Judge correctness first, then completeness "
                        "and format. Prefer the answer that matches the reference when one is given.")


class JudgeConfig(_Section):
    base_url: str | None = None
    """OpenAI-compatible endpoint of the judge model (such as http://127.0.0.1:8000/v1 from `tunesmith serve`); unset: no judge."""
    model: str = ""
    """Model name sent to the judge endpoint."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the judge's API key (a placeholder is sent when it is unset)."""
    rubric: str = DEFAULT_JUDGE_RUBRIC
    """What the judge is told to prefer; it answers A, B or TIE for each pair, asked twice with the answers swapped."""
    max_examples: int = Field(50, ge=1)
    """Judge at most this many examples per candidate (two requests each)."""
    timeout_s: float = Field(60.0, gt=0)
    """Seconds to wait for one judge reply."""


class HarnessConfig(_Section):
    tasks: list[str] = []
    """lm-evaluation-harness task names to run on every model (needs the `harness` extra); empty: none."""
    include_path: Path | None = None
    """Folder of lm-evaluation-harness task YAML files whose data are local files (no hub is reached)."""
    limit: int | None = Field(None, ge=1)
    """Run at most this many documents per task."""
    num_fewshot: int | None = Field(None, ge=0)
    """Few-shot examples per prompt (the task's default when unset)."""


class EvaluateConfig(_Section):
    max_examples: int | None = Field(None, ge=1)
    """Evaluate on at most this many held-out examples (all when unset)."""
    max_new_tokens: int = Field(128, ge=1)
    """Generation budget per answer; answers that hit it count as 'did not stop'."""
    batch_size: int = Field(32, ge=1)
    """Prompts decoded together by the continuous-batching engine (rows join and leave at every step). More rows per step use a CPU's cores better (500 quickstart prompts at 32: 8.5x one-at-a-time `generate`, `bench/eval_generation.py`); each row holds its own KV cache (45 KiB per token on the default model)."""
    test_file: str | None = None
    """Held-out chat file to evaluate on instead of the run's own validation split, or `parent`: the validation split of the run this one continued from (`train.init_from`), e.g. for DPO on pairs mined from the parent's training prompts."""
    temperature: float = Field(0.0, ge=0)
    """0: greedy answers. Above 0: task answers are sampled at this temperature, as a client sending it would get them (the OpenAI API's default is 1); every model draws the same seeded random numbers, so comparisons stay paired. General questions stay greedy."""
    samples: int = Field(1, ge=1)
    """Answers sampled per example when temperature > 0; an example's score is the mean over them (the share that was right)."""
    json_output: bool = False
    """The task answers in JSON: report JSON validity, per-field accuracy, and compare parsed objects for exact match."""
    json_schema: Path | None = None
    """JSON schema file every answer must conform to (reported as `json_schema`)."""
    labels: list[str] = []
    """Classification label set: reports `accuracy` and `macro_f1` of the label each answer names."""
    regex: str | None = None
    """Regular expression the whole answer must match (reported as `regex_match`)."""
    custom_metrics: list[str] = []
    """Your metric functions, `path/to/file.py:name` or `module:name`, each called as name(prediction, reference) -> number."""
    compare_base: bool = True
    """Also evaluate the base model on the same examples, side by side."""
    confidence: float = Field(0.95, gt=0, lt=1)
    """Confidence level of the paired-bootstrap intervals."""
    bootstrap_samples: int = Field(2000, ge=1)
    """Resamples for the paired bootstrap and the paired permutation test."""
    show_differences: int = Field(5, ge=0)
    """Examples shown per comparison where the two models differ most."""
    general_check: bool = True
    """Forgetting check: perplexity on shipped general text and accuracy on shipped general questions, for every model."""
    general_questions: int | None = Field(None, ge=1)
    """Ask only the first N shipped general questions (quicker, but a small loss may go unseen: 40 questions give about +-15 points, all 466 about +-4.5); unset: all."""
    compare_parent: bool = True
    """When the run continues an earlier one (`train.init_from`), evaluate that parent too: comparisons, gates (`parent`) and the forgetting check also judge the child against it."""
    prompt_baseline: int = Field(0, ge=0)
    """Add a contender: the base model prompted with this many training examples as few-shot turns (0: off); the report says what fine-tuning gained over prompting and what prompt tokens it saves."""
    prompt_baseline_selection: Literal["similar", "random"] = "similar"
    """How the prompt baseline picks its examples for each request: the most similar training prompts, or a fixed random set."""
    prompt_token_price: float = Field(0.15, ge=0)
    """Price of 1M prompt tokens (your currency) used to cost the prompt baseline's extra tokens per 1M requests."""
    overfit_tolerance: float = Field(0.10, ge=0)
    """Flag overfitting when validation loss ends this fraction above its best while training loss kept falling."""
    gates: list[str] = []
    """Pass/fail rules such as `exact_match >= base + 0.20` or `general_ppl <= base * 1.05` (added to --gate)."""
    judge: JudgeConfig = JudgeConfig()
    """LLM-as-judge settings (pairwise, both orders)."""
    harness: HarnessConfig = HarnessConfig()
    """lm-evaluation-harness settings."""


class CanaryConfig(_Section):
    steps: list[float] = [5, 10, 25, 50, 100]
    """Percent of the route's traffic the candidate gets at each step; it moves on after a healthy window."""
    window: int = Field(50, ge=1)
    """Candidate answers judged per step (against production's recent answers) before its share grows."""
    max_error_rate_increase: float = Field(0.02, ge=0)
    """Rolled back when the candidate's error rate (5xx, failed generations) exceeds production's by more than this."""
    max_p95_latency_ratio: float = Field(1.5, gt=0)
    """Rolled back when the candidate's p95 latency is over this many times production's."""
    max_json_validity_drop: float | None = None
    """When set, answers are checked as JSON; rolled back when the candidate's valid share is this much below production's."""


class RouteConfig(_Section):
    split: dict[str, float] = {}
    """Served names and weights (`orders@production: 90`, `orders@candidate: 10`): each request goes to one of them."""
    primary: str | None = None
    """With `shadow` or `canary`: the served name whose answers are returned (such as `orders@production`)."""
    shadow: str | None = None
    """Served name that answers every request too; its answers are only logged, never returned."""
    canary: str | None = None
    """Served name whose share grows step by step while it stays healthy, and drops to 0 when it does not."""
    canary_policy: CanaryConfig = CanaryConfig()
    """Steps, window and thresholds of the canary."""
    sticky: Literal["key", "user", "none"] = "key"
    """Keep a caller on one arm: by API key, by the request's `user` field (else the key), or not at all."""

    @model_validator(mode="after")
    def _one_kind(self) -> RouteConfig:
        kinds = [kind for kind, on in (("split", bool(self.split)), ("shadow", self.shadow is not None),
                                       ("canary", self.canary is not None)) if on]
        if len(kinds) != 1:
            raise ValueError("give exactly one of split, shadow or canary")
        if kinds[0] != "split" and not self.primary:
            raise ValueError(f"{kinds[0]} needs a primary (the served name whose answers are returned)")
        if any(weight < 0 for weight in self.split.values()) or (self.split and not sum(self.split.values())):
            raise ValueError("split weights must be >= 0 and not all 0")
        return self

    def arms(self) -> list[str]:
        """Every served name this route may send a request to."""
        return list(self.split) or [name for name in (self.primary, self.shadow, self.canary) if name]


class JobsConfig(_Section):
    enabled: bool = True
    """Serve OpenAI's fine-tuning API (/v1/files, /v1/fine_tuning/jobs) beside chat, with a worker that runs the jobs."""
    concurrency: int = Field(1, ge=1)
    """Jobs trained at once, each in its own process; more wait in the queue."""
    max_file_mb: int = Field(512, ge=1)
    """Largest file `files.create` accepts."""
    models: dict[str, str] = {}
    """Base models jobs may name besides the default (SmolLM2-135M-Instruct): name -> local folder or Hub id."""


class ServeConfig(_Section):
    host: str = "127.0.0.1"
    """Address the OpenAI-compatible server listens on."""
    port: int = Field(8000, ge=0, le=65535)
    """Port the OpenAI-compatible server listens on."""
    max_new_tokens: int = Field(256, ge=1)
    """Default `max_tokens` when a request does not set one."""
    models: list[str] = []
    """What `serve --config FILE` serves when the command names nothing: run dirs, NAME@VERSION, NAME@ALIAS."""
    serve_base: bool = True
    """Also serve each base model under its own name (to compare with the fine-tuned versions)."""
    engine: Literal["native", "vllm", "llamacpp"] = "native"
    """native (tunesmith's continuous batching, CPU or GPU), vllm (launch vLLM, GPU), llamacpp (llama-server)."""
    max_batch: int = Field(32, ge=1)
    """Most sequences decoded together; more requests wait in the queue."""
    max_waiting: int = Field(64, ge=0)
    """Most requests waiting for a place in the batch; beyond it requests get 429 with Retry-After."""
    request_timeout: float = Field(600, gt=0)
    """Seconds a request may take in all before it is dropped (503 with Retry-After)."""
    threads: int = Field(0, ge=0)
    """CPU threads the engine computes with; 0: every core (2 cores, 16 clients: 1.45x one thread's tok/s)."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """Weights the engine computes with; auto: bf16 on CPUs with bf16 instructions (1.7x fp32's tok/s) or GPUs, else fp32."""
    drain_seconds: float = Field(30, ge=0)
    """On SIGTERM or Ctrl-C: seconds the requests in flight get to finish before the server exits."""
    routes: dict[str, RouteConfig] = {}
    """Public names that route traffic between served names: weighted split, shadow, or canary with rollback."""
    keys_file: Path | None = None
    """API key store (`tunesmith keys create`); default `<home>/gateway/keys.sqlite`. With no active key the server listens on loopback only."""
    metrics_public: bool = False
    """Serve /metrics without an API key (keys still guard everything else)."""
    request_log: Path | None = None
    """Folder of the request log (every request and answer, JSONL, fsync'd); default `<home>/requests`."""
    log_content: Literal["full", "redacted", "none"] = "redacted"
    """What the request log keeps of prompts and answers: all, with PII replaced by [KIND], or nothing."""
    log_max_mb: int = Field(64, ge=1)
    """Size at which the request log file is rotated."""
    reload_seconds: float = Field(10, ge=0)
    """How often served aliases (`orders@production`) are checked in the registry and moved live; 0: never."""
    cors_origins: list[str] = []
    """Browser origins allowed to call the API (CORS); empty: none."""
    jobs: JobsConfig = JobsConfig()
    """The self-hosted fine-tuning API."""


class RegistryConfig(_Section):
    name: str | None = None
    """After `tunesmith run`, register the trained run as a version of this model (same content: same version)."""
    promote_to: str | None = None
    """Alias to move to the new version after registering (such as `production`), when the promotion gates pass."""
    promote_if: list[str] = []
    """Gates a promotion must pass besides evaluate.gates, such as `exact_match >= champion + 0.02`."""
    track: bool = False
    """Log every trained and evaluated run to MLflow (params, loss curves, metrics), registered or not."""


class RunConfig(_Section):
    name: str = "run"
    """Run name; artifacts go to `<output_dir>/<name>`."""
    base_model: str = "default"
    """`default` (embedded SmolLM2-135M-Instruct), a local Hugging Face model directory, or a Hub id."""
    output_dir: Path = Path("runs")
    """Folder that holds run directories."""
    seed: int = 0
    """Seed for the split, LoRA init and data order."""
    data: DataConfig
    """Data stage settings."""
    train: TrainConfig = TrainConfig()
    """Training stage settings."""
    evaluate: EvaluateConfig = EvaluateConfig()
    """Evaluation stage settings."""
    serve: ServeConfig = ServeConfig()
    """Serving settings."""
    registry: RegistryConfig = RegistryConfig()
    """Model registry settings (MLflow; `MLFLOW_TRACKING_URI` names a server, else a local store in the home)."""

    @property
    def run_dir(self) -> Path:
        return self.output_dir / self.name


def load_config(path: Path | str, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML config, apply `a.b=c` overrides, validate; relative data paths resolve against the YAML's folder."""
    path = Path(path)
    if path.is_dir():
        raise TunesmithError(f"{path} is a directory; pass a config YAML file such as examples/quickstart/config.yaml "
                             "or configs/lora-sft.yaml")
    if not path.is_file():
        raise TunesmithError(f"config file not found: {path} (pass the path to a YAML file such as "
                             "examples/quickstart/config.yaml or configs/lora-sft.yaml)")
    raw = _read_yaml(path)
    for item in overrides:
        apply_override(raw, item)
    _resolve_data_paths(raw, path.parent)
    _resolve_evaluate_paths(raw, path.parent)
    return validate_config(raw, source=str(path))


def load_serve_config(path: Path | str) -> ServeConfig:
    """The `serve:` section of a YAML file (a whole run config or a file holding only that section)."""
    path = Path(path)
    if not path.is_file():
        raise TunesmithError(f"config file not found: {path}")
    raw = _read_yaml(path)
    section = raw.get("serve", {}) if isinstance(raw, dict) and ("serve" in raw or "data" in raw) else raw
    try:
        return ServeConfig.model_validate(section or {})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise TunesmithError(f"{path}: serve.{where}: {first['msg']}") from None


def load_run_config(run_dir: Path | str, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """The config a run was prepared with (`<run_dir>/config.yaml`), with `a.b=c` overrides applied."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise TunesmithError(f"{run_dir} is not a tunesmith run directory (no config.yaml); run `tunesmith prepare CONFIG` first")
    raw = _read_yaml(path)
    for item in overrides:
        apply_override(raw, item)
    return validate_config(raw, source=str(path))


def apply_override(raw: dict, item: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (numbers, booleans, lists)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise TunesmithError(f"override {item!r} is not key=value (example: train.lora.r=32)")
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise TunesmithError(f"override {item!r}: {part!r} is not a section")
    node[parts[-1]] = _override_value(item, value)


def _override_value(item: str, value: str):
    """An override's value parsed as YAML; text that is not valid YAML is a clear error, not a parser traceback."""
    if not value.strip():
        return None
    try:
        return yaml.safe_load(value)
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        problem = getattr(exc, "problem", None) or " ".join(str(exc).split(";")[0].split()) or "nested too deeply"
        key, shown = item.partition("=")[0], item if len(item) <= 80 else item[:80] + "..."
        raise TunesmithError(f"override {shown!r}: the value is not valid YAML ({problem[:200]}); quote text that "
                             f"holds YAML characters such as [ {{ : #, e.g. {key[:40]}='\"text\"'") from None


def _read_yaml(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or " ".join(str(exc).split(";")[0].split()) or "nested too deeply"
        raise TunesmithError(f"{where}: not valid YAML ({problem}); fix the syntax") from None
    if not isinstance(raw, dict):
        raise TunesmithError(f"{path}: the config must be a YAML mapping of option: value")
    return raw


def validate_config(raw: dict, source: str = "config") -> RunConfig:
    """Validate a config dict; every problem is reported with its dotted key and a hint."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe_error(err) for err in exc.errors()]
        raise TunesmithError(f"{source}: invalid config\n  " + "\n  ".join(lines)) from None


def _describe_error(err: dict) -> str:
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc)
    if err["type"] == "extra_forbidden":
        known = _known_keys(loc[:-1])
        close = difflib.get_close_matches(loc[-1], known, n=1) or [
            k for k in known if loc[-1].startswith(k) or k.startswith(loc[-1])][:1]
        hint = f"did you mean {'.'.join(loc[:-1] + close)!r}?" if close else f"known keys here: {', '.join(known)}"
        return f"{key}: unknown option; {hint}"
    return f"{key}: {err['msg']} (got {err.get('input')!r})"


def _known_keys(loc: list[str]) -> list[str]:
    model: type[BaseModel] = RunConfig
    for part in loc:
        field = model.model_fields.get(part)
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _resolve_data_paths(raw: dict, base: Path) -> None:
    data = raw.get("data")
    if not isinstance(data, dict):
        return
    places = [(data, key) for key in ("train", "validation")]
    places += [(source, "path") for source in data.get("sources") or [] if isinstance(source, dict)]
    if isinstance(data.get("benchmark_files"), list):
        places += [(data["benchmark_files"], index) for index in range(len(data["benchmark_files"]))]
    for holder, key in places:
        value = holder[key] if isinstance(holder, list) else holder.get(key)
        if isinstance(value, str) and value and not Path(value).is_absolute():
            # Relative to the YAML file's folder; fall back to the working directory where that is what exists.
            beside_yaml = base / value
            chosen = beside_yaml if beside_yaml.exists() or not Path(value).exists() else Path(value)
            holder[key] = str(chosen.resolve())


def _resolve_evaluate_paths(raw: dict, base: Path) -> None:
    """Schemas, harness task folder, custom-metric and reward files, and a replay file are relative to the YAML
    file's folder."""

    def resolved(value: str) -> str:
        return value if Path(value).is_absolute() else str((base / value).resolve())

    def resolve_refs(section: dict, key: str) -> None:  # `file.py:name` entries; `module:name` stays as it is
        if isinstance(section.get(key), list):
            section[key] = [resolved(ref.rpartition(":")[0]) + ":" + ref.rpartition(":")[2]
                            if isinstance(ref, str) and ref.rpartition(":")[0].endswith(".py") else ref
                            for ref in section[key]]

    section = raw.get("evaluate")
    if isinstance(section, dict):
        if isinstance(section.get("json_schema"), str):
            section["json_schema"] = resolved(section["json_schema"])
        test_file = section.get("test_file")
        if isinstance(test_file, str) and test_file != "parent" and not Path(test_file).is_absolute():
            beside_yaml = base / test_file  # like data files: the working directory where that is what exists
            section["test_file"] = str((beside_yaml if beside_yaml.exists() or not Path(test_file).exists()
                                        else Path(test_file)).resolve())
        harness = section.get("harness")
        if isinstance(harness, dict) and isinstance(harness.get("include_path"), str):
            harness["include_path"] = resolved(harness["include_path"])
        resolve_refs(section, "custom_metrics")
    grpo = (raw.get("train") or {}).get("grpo") if isinstance(raw.get("train"), dict) else None
    if isinstance(grpo, dict):
        if isinstance(grpo.get("json_schema"), str):
            grpo["json_schema"] = resolved(grpo["json_schema"])
        resolve_refs(grpo, "rewards")
    replay = (raw.get("data") or {}).get("replay") if isinstance(raw.get("data"), dict) else None
    if isinstance(replay, dict) and isinstance(replay.get("source"), str) and replay["source"] != "self_distill":
        replay["source"] = resolved(replay["source"])


def option_rows(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, description) for every option, sections expanded."""
    rows = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(option_rows(ann, f"{prefix}{name}."))
            continue
        value_type = get_args(ann)[-1] if get_origin(ann) is dict else None
        if isinstance(value_type, type) and issubclass(value_type, BaseModel):  # a mapping of named sections
            rows.append((f"{prefix}{name}", "mapping", "{}", field.description or ""))
            rows.extend(option_rows(value_type, f"{prefix}{name}.<NAME>."))
            continue
        if get_origin(ann) is Literal:
            type_name = " | ".join(str(choice) for choice in get_args(ann))
        else:
            type_name = getattr(ann, "__name__", None) or str(ann).replace("typing.", "").replace("pathlib.", "")
        value = str(field.default) if isinstance(field.default, Path) else field.default
        default = "required" if field.is_required() else repr(value)
        rows.append((f"{prefix}{name}", type_name, default, field.description or ""))
    return rows


def options_markdown() -> str:
    """docs/config.md: every option, generated from the attribute docstrings above."""
    lines = ["# Config options", "", "Generated by `tunesmith options --markdown`; do not edit by hand.", "",
             "| option | type | default | meaning |", "|---|---|---|---|"]
    for key, type_name, default, meaning in option_rows():
        lines.append(f"| `{key}` | {type_name.replace('|', '&#124;')} | `{default}` | {meaning.replace('|', '&#124;')} |")
    return "\n".join(lines) + "\n"


def config_to_yaml(config: RunConfig) -> str:
    """The fully resolved config, as YAML, for the run directory."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
