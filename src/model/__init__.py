"""Keye-VL-1.5 in plain PyTorch: SigLIP ViT, 2x2 merge projector, Qwen3 LLM with 3D RoPE."""
from keyetron.model.config import KeyeConfig, TextConfig, VisionConfig, load_model_config  # noqa: F401
from keyetron.model.keye import (  # noqa: F401
    KeyeVLModel,
    ModelOutput,
    build_model,
    parameter_counts,
    set_activation_checkpointing,
    set_attention_kernel,
)
