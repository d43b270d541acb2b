"""A training recipe: one typed YAML file that says everything a run does.

Recipes are declarative (no code). Unknown or mistyped keys fail at start-up naming the
file and the key. ``--set a.b=value`` overrides any key from the command line, with the
value read as YAML (``--set train.steps=20``, ``--set train.freeze=[vit]``).
Relative paths are taken from the directory the job is started in.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from keyetron.config import ConfigError, from_dict, to_dict
from keyetron.data.dataset import MediaConfig
from keyetron.data.loader import LoaderConfig
from keyetron.objectives.contrastive import PARTS as CONTRASTIVE_PARTS  # logit: logit_scale and logit_bias
from keyetron.optim import OptimSection
from keyetron.parallel.config import ParallelConfig
from keyetron.train.schedule import ScheduleConfig, lr_lambda

OBJECTIVES = ("lm", "siglip")


@dataclass
class ModelSection:
    config: str = "small"  # a named model config (keye-8b, small, tiny) or a YAML path
    init: str | None = None  # weights to start from: a Hugging Face folder, a keyetron checkpoint or merge output
    rope_theta: float | None = None  # the LLM's RoPE base (context extension: 1e6 -> 8e6); None: the config's
    attention: str = "auto"  # attention kernel (keyetron.backend.attention)
    activation_checkpointing: list[str] = field(default_factory=list)  # modules to recompute: vit, llm


def model_config_of(model: ModelSection):
    """The architecture a run trains: ``model.config`` with the section's overrides (``rope_theta``)."""
    import dataclasses

    from keyetron.model.config import load_model_config

    cfg = load_model_config(model.config)
    if model.rope_theta is not None:  # context extension raises the RoPE base (1e6 -> 8e6)
        cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, rope_theta=model.rope_theta))
    return cfg


@dataclass
class DataSection:
    sources: list[str] = field(default_factory=list)  # .jsonl manifests and/or .tar WebDataset shards
    eval: str | None = None  # held-out .jsonl whose samples end with the answer (meta.answer)
    media: MediaConfig = field(default_factory=MediaConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    # Decode offload (keyetron io-server): "host:port" of servers that decode images and videos
    # for the training ranks; a dead server's work falls back to local decoding. Empty: decode here.
    decode_servers: list[str] = field(default_factory=list)
    decode_secret_file: str | None = None  # the servers' shared secret; None: $KEYETRON_IO_SECRET
    decode_timeout_s: float = 60.0


@dataclass
class TrainSection:
    steps: int = 100  # optimizer steps
    grad_accum: int = 1  # packed rows per optimizer step (one row per forward)
    seed: int = 0
    # bf16: bf16 weights, fp32 main gradients and master weights (Megatron's mixed precision);
    # fp32; autocast: fp32 weights under bf16 autocast; auto: bf16 where the device runs it fast, else fp32
    precision: str = "auto"
    fp8: bool = False  # FP8 matmuls in the LLM decoder's linear layers (torchao; Hopper / Ada GPUs)
    compile: bool = False  # torch.compile each transformer block (ViT and LLM)
    freeze: list[str] = field(default_factory=list)  # parameter-name prefixes: vit, projector, llm.embed_tokens, ...
    # lm: next-token loss of the whole model (stages 1-3); siglip: stage 0, the ViT against a SigLIP
    # text tower with the sigmoid contrastive loss (the `contrastive` section; keyetron.train.tasks.ContrastiveTask)
    objective: str = "lm"

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.grad_accum <= 0:
            raise ValueError(f"steps and grad_accum must be positive, got {self.steps}, {self.grad_accum}")
        if self.precision not in ("auto", "bf16", "fp32", "autocast"):
            raise ValueError(f"precision {self.precision!r} is not one of ['auto', 'bf16', 'fp32', 'autocast']")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective {self.objective!r} is not one of {list(OBJECTIVES)}")


@dataclass
class ContrastiveSection:
    """Stage 0 (``train.objective: siglip``): the ViT's SigLIP partner and the pair batches."""

    text_tower: str = "keye-8b"  # a SigLIP text config (keye-8b, siglip2-so400m, small, tiny) or a YAML path
    # A SiglipModel folder: text tower, logit scale and bias (and the pooling head when it has one)
    siglip_checkpoint: str | None = None
    load_vit: bool = False  # also load the ViT from siglip_checkpoint's vision_model.* (after model.init)
    freeze_text_tower: bool = False
    batch_size: int = 32  # image-caption pairs per step per data-parallel rank (negatives: every rank's)
    tokenizer: str | None = None  # caption tokenizer folder; None: siglip_checkpoint's if it has one, else Qwen3
    lr_scale: dict[str, float] = field(default_factory=dict)  # optim.lr multiplier per part (CONTRASTIVE_PARTS)

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        bad = sorted(set(self.lr_scale) - set(CONTRASTIVE_PARTS))
        if bad:
            raise ValueError(f"lr_scale: unknown part(s) {bad}; use {list(CONTRASTIVE_PARTS)}")
        if self.load_vit and not self.siglip_checkpoint:
            raise ValueError("load_vit: true needs siglip_checkpoint (the folder to load the ViT from)")


@dataclass
class CheckpointSection:
    every: int = 0  # optimizer steps between checkpoints; 0: only at the end
    keep: int = 2  # newest checkpoints kept
    resume: str = "auto"  # auto (latest in the run's checkpoint folder, if any) | none | a checkpoint path
    # The next stage of a longer training (e.g. 128K annealing after 8K pre-training): when this
    # run has no checkpoint of its own yet, continue from ``start_from`` (any layout, any row
    # length), carrying over what ``start_reset`` does not name.
    start_from: str | None = None
    start_reset: list[str] = field(default_factory=lambda: ["data", "schedule"])  # data | schedule | optimizer

    def __post_init__(self) -> None:
        bad = sorted(set(self.start_reset) - {"data", "schedule", "optimizer"})
        if bad:
            raise ValueError(f"checkpoint.start_reset: unknown {bad}; choose from data, schedule, optimizer")


@dataclass
class LogSection:
    every: int = 10  # steps between log lines / TensorBoard points
    tensorboard: bool = True
    peak_tflops: float | None = None  # per-device peak for MFU; None: from the device table (unknown on CPU)
    sample_ids: bool = False  # write each step's sample ids per data-parallel rank (sample_ids.dp<r>.jsonl)


@dataclass
class EvalSection:
    every: int = 0  # steps between evaluations; 0: only at the end
    max_samples: int = 0  # 0: the whole eval split
    max_new_tokens: int = 12
    batch_size: int = 32  # prompts decoded together (packed, one forward per generated token)


@dataclass
class Recipe:
    name: str = "run"
    output_dir: str = "runs/run"  # checkpoints/, tb/, train.log, metrics.jsonl, summary.json
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    eval: EvalSection = field(default_factory=EvalSection)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    contrastive: ContrastiveSection = field(default_factory=ContrastiveSection)

    def __post_init__(self) -> None:
        if not self.data.sources:
            raise ValueError("data.sources is empty: list at least one .jsonl manifest or .tar shard")
        if self.train.objective == "siglip":
            self._check_siglip()
        lr_lambda(self.schedule, self.train.steps)  # step budgets that cannot work fail here, naming the file
        bad = sorted(set(self.model.activation_checkpointing) - {"vit", "llm"})
        if bad:
            raise ValueError(f"model.activation_checkpointing: unknown module(s) {bad}; use vit and/or llm")

    def _check_siglip(self) -> None:
        """Stage 0 runs data parallel only, one batch per step, with its own lr scales."""
        for dim in ("tp", "pp", "cp"):
            if getattr(self.parallel, dim) != 1:
                raise ValueError(f"parallel.{dim}={getattr(self.parallel, dim)}: stage 0 (train.objective: siglip) "
                                 f"is data parallel only; set parallel.{dim}: 1 (the ViT and text tower fit on one "
                                 "device)")
        if self.train.grad_accum != 1:
            raise ValueError(f"train.grad_accum={self.train.grad_accum}: the sigmoid loss of a batch is not a sum "
                             "over micro-batches (every pair is a negative of every other); set train.grad_accum: 1 "
                             "and size the step with contrastive.batch_size")
        if self.optim.lr_scale:
            raise ValueError(f"optim.lr_scale {self.optim.lr_scale}: stage 0 scales lr per objective part; use "
                             f"contrastive.lr_scale with {list(CONTRASTIVE_PARTS)}")
        if self.checkpoint.start_from:
            raise ValueError("checkpoint.start_from: stage 0 starts from weights only; use model.init (and "
                             "contrastive.siglip_checkpoint)")

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.output_dir) / "checkpoints"


def apply_override(data: dict, assignment: str) -> None:
    """``a.b.c=value`` sets ``data['a']['b']['c']`` to the YAML reading of value."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. train.steps=20")
    *path, last = key.split(".")
    node = data
    for part in path:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {assignment!r}: {part} is not a section")
    node[last] = yaml.safe_load(raw)


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist; recipes live in recipes/ (e.g. recipes/demo-small.yaml)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of sections, got {type(data).__name__}")
    for assignment in overrides:
        apply_override(data, assignment)
    return from_dict(Recipe, data, str(path))


def recipe_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(to_dict(recipe), sort_keys=False)


__all__ = ["CheckpointSection", "ContrastiveSection", "DataSection", "EvalSection", "LogSection", "ModelSection",
           "model_config_of",
           "OptimSection", "Recipe", "TrainSection", "apply_override", "load_recipe", "recipe_yaml"]
