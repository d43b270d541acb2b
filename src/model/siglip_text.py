"""SigLIP text tower (stage 0's contrastive partner of the ViT) and the SigLIP checkpoint layout.

The tower is transformers' ``SiglipTextModel`` in plain PyTorch: token + learned absolute
position embeddings, pre-LN encoder blocks (q/k/v/out with bias, gelu-tanh MLP),
a final LayerNorm, and the pooled output = the LAST token's state through ``head``.
Captions are padded to a fixed length and attend to every position, pads included,
as SigLIP was trained (no attention mask); so the last token, often a pad, sees the
whole caption.

Checkpoint names follow a ``SiglipModel`` checkpoint (``SIGLIP_NAMES``): any module with
the children ``text_tower``, ``pool_head``, ``vit`` and the parameters ``logit_scale``,
``logit_bias`` (``keyetron.train.contrastive.ContrastiveObjective``) loads from and saves
to that layout.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from keyetron.backend.attention import varlen_attention
from keyetron.checkpoint import save_tensors
from keyetron.config import ConfigError, load_yaml
from keyetron.model.checkpointing import CheckpointableBlock
from keyetron.model.config import VisionConfig
from keyetron.model.hf_checkpoint import SINGLE_FILE, load_into

TEXT_CONFIG_DIR = Path(__file__).parent / "configs" / "siglip_text"


@dataclass(frozen=True)
class SiglipTextConfig:
    """Defaults: the text tower of SigLIP-so400m-patch14-384 (the checkpoint Keye's ViT starts from)."""

    vocab_size: int = 32000  # SigLIP's SentencePiece vocabulary; SigLIP 2 (Gemma tokenizer): 256000
    hidden_size: int = 1152
    num_layers: int = 27
    num_heads: int = 16
    intermediate_size: int = 4304
    max_length: int = 64  # learned positions; captions are padded / truncated to this many tokens
    projection_size: int = 1152  # output of ``head``: must equal the ViT width (the pooling head's output)
    layer_norm_eps: float = 1e-6
    name: str = "custom"

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"text hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def available_text_configs() -> list[str]:
    return sorted(p.stem for p in TEXT_CONFIG_DIR.glob("*.yaml"))


def load_text_config(name_or_path: str | Path) -> SiglipTextConfig:
    """A named text tower config (``tiny``, ``small``, ``keye-8b``, ``siglip2-so400m``) or a YAML path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return load_yaml(SiglipTextConfig, path)
    named = TEXT_CONFIG_DIR / f"{name_or_path}.yaml"
    if not named.is_file():
        raise ConfigError(f"unknown SigLIP text tower config {str(name_or_path)!r}: use one of "
                          f"{available_text_configs()} or a path to a YAML file")
    return load_yaml(SiglipTextConfig, named)


class SiglipMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class TextAttention(nn.Module):
    def __init__(self, cfg: SiglipTextConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)
        self.kernel = "auto"

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = (p(x).view(T, -1, self.head_dim) for p in (self.q_proj, self.k_proj, self.v_proj))
        o = varlen_attention(q, k, v, cu_seqlens, causal=False, kernel=self.kernel)
        return self.out_proj(o.reshape(T, -1))


class TextBlock(CheckpointableBlock):
    def __init__(self, cfg: SiglipTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = TextAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg.hidden_size, cfg.intermediate_size)

    def block_forward(self, x, cu_seqlens):
        x = x + self.self_attn(self.layer_norm1(x), cu_seqlens)
        return x + self.mlp(self.layer_norm2(x))


class TextEmbeddings(nn.Module):
    def __init__(self, cfg: SiglipTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_length, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(input_ids) + self.position_embedding.weight[: input_ids.shape[1]]


class SiglipTextTower(nn.Module):
    """(B, L) fixed-length caption ids -> (B, projection_size) caption embeddings (not normalised)."""

    def __init__(self, cfg: SiglipTextConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = TextEmbeddings(cfg)
        self.layers = nn.ModuleList(TextBlock(cfg) for _ in range(cfg.num_layers))
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.projection_size)

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B, L, hidden) after the final LayerNorm."""
        B, L = input_ids.shape
        if L > self.cfg.max_length:
            raise ValueError(f"captions are {L} tokens, the text tower has {self.cfg.max_length} positions")
        x = self.embeddings(input_ids).reshape(B * L, -1)
        # Every caption is one attention sequence of the pack.
        cu = torch.arange(0, B * L + 1, L, dtype=torch.int32, device=x.device)
        for layer in self.layers:
            x = layer(x, cu)
        return self.final_layer_norm(x).view(B, L, -1)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden_states(input_ids)[:, -1])


@torch.no_grad()
def init_siglip_weights(module: nn.Module, seed: int | None = None) -> None:
    """SigLIP's own init (big_vision, as transformers' ``SiglipPreTrainedModel``) for a text tower or head.

    Embeddings normal(1/sqrt(width)); attention, MLP and pooling in-projections
    xavier-uniform; other linears lecun-normal; zero biases. Much larger than the
    LLM-style normal(0.02): with that, a from-scratch tower's outputs barely depend on
    its input and the sigmoid loss stalls at the constant-logit optimum.
    """
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    for name, p in module.named_parameters():
        if name.endswith("bias"):  # also in_proj_bias
            p.zero_()
        elif p.dim() == 1:  # LayerNorm scales
            p.fill_(1.0)
        elif "embedding" in name:
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
        elif name.endswith(("_proj.weight", "fc1.weight", "fc2.weight", "in_proj_weight", "probe")):
            p.copy_(nn.init.xavier_uniform_(torch.empty(p.shape), generator=gen))
        else:  # the text tower's output head
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)


# -- the SigLIP checkpoint layout ---------------------------------------------------------
# (our prefix, SiglipModel prefix), most specific first.
SIGLIP_NAMES = (
    ("text_tower.layers.", "text_model.encoder.layers."),
    ("text_tower.", "text_model."),
    ("pool_head.", "vision_model.head."),
    ("vit.layers.", "vision_model.encoder.layers."),
    ("vit.", "vision_model."),
    ("logit_scale", "logit_scale"),
    ("logit_bias", "logit_bias"),
)
HF_TEXT_DEFAULTS = dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, max_position_embeddings=64, layer_norm_eps=1e-6)


def _rename(name: str, to_hf: bool) -> str | None:
    for ours, theirs in SIGLIP_NAMES:
        src, dst = (ours, theirs) if to_hf else (theirs, ours)
        if name.startswith(src):
            return dst + name[len(src):]
    return None


def load_siglip_checkpoint(module: nn.Module, path: str | Path, vision: bool = False) -> list[str]:
    """Load a ``SiglipModel`` checkpoint (folder or .safetensors) into ``module``; return our names loaded.

    Always loads ``text_model.*``, ``logit_scale`` and ``logit_bias`` (all required), and
    ``vision_model.head.*`` when the checkpoint has it (SigLIP 2 NaFlex and
    ``vision_use_head: false`` checkpoints may not: the head keeps its init). With
    ``vision=True`` the ViT is loaded from ``vision_model.*`` too. Nothing is copied unless
    every check passes (``CheckpointError`` lists missing / unexpected / mis-shaped keys).
    """
    params = dict(module.named_parameters())

    def rename(ck_name: str) -> str | None:
        if ck_name.startswith("vision_model.embeddings.packing_position_embedding."):
            return None
        if ck_name.startswith("vision_model.") and not ck_name.startswith("vision_model.head.") and not vision:
            return None
        ours = _rename(ck_name, to_hf=False)
        return ours if ours is not None else f"<unknown>{ck_name}"

    required = [n for n in params if n.startswith(("text_tower.", "logit_")) or (vision and n.startswith("vit."))]
    return load_into(module, path, rename, required=required)


def siglip_config_dict(text: SiglipTextConfig, vision: VisionConfig | None) -> dict:
    """A transformers ``SiglipConfig`` for these towers (the ViT's 2D RoPE has no SigLIP field)."""
    out = {"model_type": "siglip", "architectures": ["SiglipModel"], "text_config": {
        "vocab_size": text.vocab_size, "hidden_size": text.hidden_size, "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_layers, "num_attention_heads": text.num_heads,
        "max_position_embeddings": text.max_length, "projection_size": text.projection_size,
        "layer_norm_eps": text.layer_norm_eps, "hidden_act": "gelu_pytorch_tanh"}}
    if vision is not None:
        out["vision_config"] = {
            "hidden_size": vision.hidden_size, "intermediate_size": vision.intermediate_size,
            "num_hidden_layers": vision.num_layers, "num_attention_heads": vision.num_heads,
            "num_channels": vision.num_channels, "patch_size": vision.patch_size,
            "image_size": vision.position_table_side * vision.patch_size, "layer_norm_eps": vision.layer_norm_eps,
            "hidden_act": "gelu_pytorch_tanh", "vision_use_head": True}
    return out


def save_siglip_checkpoint(module: nn.Module, out_dir: str | Path) -> Path:
    """Write ``model.safetensors`` + ``config.json`` in the ``SiglipModel`` layout (one file)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, p in module.named_parameters():
        hf = _rename(name, to_hf=True)
        assert hf is not None, f"parameter {name} has no SigLIP name"
        tensors[hf] = p.detach().to("cpu").contiguous()
    save_tensors(tensors, out_dir / SINGLE_FILE, metadata={"format": "pt"})
    vit = getattr(module, "vit", None)
    config = siglip_config_dict(module.text_tower.cfg, vit.cfg if vit is not None else None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def text_config_from_hf(path: str | Path) -> SiglipTextConfig:
    """The text tower config of a SigLIP checkpoint folder (its ``config.json``, transformers' defaults)."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ConfigError(f"{file}: not found; point at a SigLIP checkpoint folder (config.json + safetensors)")
    raw = {**HF_TEXT_DEFAULTS, **json.loads(file.read_text()).get("text_config", {})}
    return SiglipTextConfig(
        vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"], num_layers=raw["num_hidden_layers"],
        num_heads=raw["num_attention_heads"], intermediate_size=raw["intermediate_size"],
        max_length=raw["max_position_embeddings"], projection_size=raw.get("projection_size") or raw["hidden_size"],
        layer_norm_eps=raw["layer_norm_eps"], name=str(path))
