"""Model configs: typed dataclasses, loaded by name (``keye-8b``, ``small``, ``tiny``) or from a YAML path."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from keyetron.config import ConfigError, load_yaml

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class VisionConfig:
    """SigLIP ViT at native resolution (Keye-VL-1.5 uses SigLIP-so400m-patch14-384)."""

    hidden_size: int = 1152
    num_layers: int = 27
    num_heads: int = 16
    intermediate_size: int = 4304
    patch_size: int = 14
    num_channels: int = 3
    position_table_side: int = 27  # the learned absolute table is side x side, resized per image
    layer_norm_eps: float = 1e-6
    rope_theta: float = 10000.0

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        if self.head_dim % 4:
            raise ValueError(f"vision head_dim {self.head_dim} must be divisible by 4 (2D RoPE over rows and columns)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class ProjectorConfig:
    """2x2 patch merge -> LayerNorm(4*D) -> Linear -> GELU -> Linear (Keye-VL-1.5 normalises after the merge)."""

    merge_size: int = 2
    norm_eps: float = 1e-5


@dataclass(frozen=True)
class TextConfig:
    """Qwen3 decoder with sectioned 3D (t, h, w) RoPE."""

    vocab_size: int = 151936
    hidden_size: int = 4096
    num_layers: int = 36
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    intermediate_size: int = 12288
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    # Frequency pairs given to the (t, h, w) axes; they sum to head_dim / 2.
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    tie_word_embeddings: bool = False

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} not divisible by num_kv_heads {self.num_kv_heads}")
        if sum(self.mrope_section) * 2 != self.head_dim:
            raise ValueError(f"mrope_section {list(self.mrope_section)} must sum to head_dim/2 = {self.head_dim // 2}")


@dataclass(frozen=True)
class KeyeConfig:
    """The whole model: ViT, projector, LLM and the token ids that tie them together."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    # A local tokenizer folder (tokenizer.json); None uses the bundled Qwen3 tokenizer files.
    tokenizer: str | None = None
    name: str = "custom"


def config_yaml(cfg: KeyeConfig) -> str:
    """The config as YAML (``load_model_config`` reads it back): what checkpoints and merges write as
    ``model.yaml``, every override included."""
    import yaml

    from keyetron.config import to_dict

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def config_differences(a: KeyeConfig, b: KeyeConfig) -> list[str]:
    """The architecture fields in which two configs differ, as ``"text.rope_theta: 1000000.0 != 8000000.0"``
    (the name and tokenizer folder are not architecture)."""
    import dataclasses

    out = []

    def walk(x, y, prefix):
        for f in dataclasses.fields(x):
            if f.name in ("name", "tokenizer"):
                continue
            u, v = getattr(x, f.name), getattr(y, f.name)
            if dataclasses.is_dataclass(u):
                walk(u, v, f"{prefix}{f.name}.")
            elif u != v:
                out.append(f"{prefix}{f.name}: {u} != {v}")

    walk(a, b, "")
    return out


def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_model_config(name_or_path: str | Path) -> KeyeConfig:
    """A named config (``keye-8b``, ``small``, ``tiny``) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return load_yaml(KeyeConfig, path)
    named = CONFIG_DIR / f"{name_or_path}.yaml"
    if not named.is_file():
        raise ConfigError(
            f"unknown model config {str(name_or_path)!r}: use one of {available_configs()} or a path to a YAML file"
        )
    return load_yaml(KeyeConfig, named)
