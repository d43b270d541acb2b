"""Load and save the Hugging Face checkpoint layout of Keye-VL-1.5, and initialise parts
from a SigLIP vision checkpoint or a Qwen3 checkpoint.

Our module names differ from the released names only by prefixes (see ``KEYE_NAMES``).
Every load is checked before any tensor is copied: missing keys, unexpected keys and
shape mismatches are one error that lists them all.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from torch import nn

from keyetron.checkpoint import save_tensors
from keyetron.config import ConfigError, from_dict, to_dict
from keyetron.model.config import KeyeConfig, ProjectorConfig, TextConfig, VisionConfig

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# (our prefix, released prefix), most specific first; the map is a bijection on the rest of the name.
KEYE_NAMES = (
    ("vit.layers.", "visual.vision_model.encoder.layers."),
    ("vit.", "visual.vision_model."),
    ("projector.", "mlp_AR."),
    ("llm.lm_head.", "lm_head."),
    ("llm.", "model."),
)
# Present in the released checkpoint, unused by Keye-VL-1.5's forward: skipped on load.
KEYE_UNUSED = ("visual.vision_model.head.", "visual.vision_model.embeddings.packing_position_embedding.")


class CheckpointError(RuntimeError):
    """A checkpoint does not match the model; the message lists every offending key."""


def _rename(name: str, table, forward: bool) -> str | None:
    for ours, theirs in table:
        src, dst = (ours, theirs) if forward else (theirs, ours)
        if name.startswith(src):
            return dst + name[len(src):]
    return None


def to_hf_name(name: str) -> str:
    hf = _rename(name, KEYE_NAMES, forward=True)
    assert hf is not None, f"parameter {name} has no released name"
    return hf


def from_hf_name(name: str) -> str | None:
    """Our name for a released key, or None when the key is a known unused one."""
    if name.startswith(KEYE_UNUSED):
        return None
    return _rename(name, KEYE_NAMES, forward=False) or f"<unknown>{name}"


# -- reading -------------------------------------------------------------------------------
def checkpoint_files(path: str | Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file that holds it.

    ``path`` is a folder with ``model.safetensors.index.json`` (sharded) or
    ``model.safetensors``, or a single ``.safetensors`` file.
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        files = [path]
    elif (path / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{path / INDEX_FILE}: not a safetensors index ({err}); re-save the checkpoint") from err
        missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if missing:
            raise CheckpointError(f"{path}: index {INDEX_FILE} names shard file(s) that do not exist: {missing}")
        return {name: path / f for name, f in weight_map.items()}
    elif (path / SINGLE_FILE).is_file():
        files = [path / SINGLE_FILE]
    else:
        raise CheckpointError(
            f"{path}: no checkpoint found; expected a folder with {INDEX_FILE} or {SINGLE_FILE}, or a .safetensors file"
        )
    names = {}
    for f in files:
        with safe_open(f, framework="pt") as handle:
            names.update({k: f for k in handle.keys()})
    return names


def _shapes(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    by_file: dict[Path, list[str]] = {}
    for name, f in files.items():
        by_file.setdefault(f, []).append(name)
    for f, names in by_file.items():
        with safe_open(f, framework="pt") as handle:
            for name in names:
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    return shapes


def _listing(title: str, names: list[str], limit: int = 20) -> str:
    shown = "\n    ".join(names[:limit])
    more = f"\n    ... and {len(names) - limit} more" if len(names) > limit else ""
    return f"  {title} ({len(names)}):\n    {shown}{more}"


@torch.no_grad()
def load_into(
    module: nn.Module,
    path: str | Path,
    rename: Callable[[str], str | None],
    required: list[str] | None = None,
    fill: dict[str, str] | None = None,
) -> list[str]:
    """Copy checkpoint tensors into ``module``'s parameters; return the names loaded.

    ``rename`` maps a checkpoint name to a parameter name of ``module`` (None: skip the key
    silently, e.g. a text tower; a name not in the module counts as unexpected).
    ``required`` lists the parameters that must be present (default: all of them).
    ``fill`` copies a parameter from another one after loading when the checkpoint lacks
    it (tied embeddings). Nothing is copied unless every check passes.
    """
    params = dict(module.named_parameters(remove_duplicate=False))
    on_meta = [n for n, p in params.items() if p.is_meta]
    if on_meta:
        raise CheckpointError(f"loading {path}: the model's parameters are on the meta device ({on_meta[0]}, ...), "
                              "which holds no values; build the model on a real device (build_model(cfg), the "
                              "default) before loading parts into it, or load a whole checkpoint with load_hf_model")
    files = checkpoint_files(path)
    shapes = _shapes(files)
    source_of: dict[str, str] = {}
    unexpected = []
    for ck_name in files:
        ours = rename(ck_name)
        if ours is None:
            continue
        if ours not in params:
            unexpected.append(ck_name)
        else:
            source_of[ours] = ck_name
    fill = {k: v for k, v in (fill or {}).items() if k not in source_of and v in source_of}
    required = list(params) if required is None else required
    missing = [n for n in required if n not in source_of and n not in fill]
    mismatched = [
        f"{ck} {list(shapes[ck])} -> {ours} {list(params[ours].shape)}"
        for ours, ck in source_of.items() if tuple(params[ours].shape) != shapes[ck]
    ]
    if missing or unexpected or mismatched:
        parts = [f"checkpoint {path} does not match the model:"]
        if missing:
            parts.append(_listing("missing keys (model parameters the checkpoint lacks)", missing))
        if unexpected:
            parts.append(_listing("unexpected keys (checkpoint tensors the model has no place for)", sorted(unexpected)))
        if mismatched:
            parts.append(_listing("shape mismatches (checkpoint -> model)", mismatched))
        parts.append("  check that the model config matches the checkpoint (see config.json beside it)")
        raise CheckpointError("\n".join(parts))
    by_file: dict[Path, list[str]] = {}
    for ours, ck in source_of.items():
        by_file.setdefault(files[ck], []).append(ours)
    for f, ours_names in by_file.items():
        with safe_open(f, framework="pt") as handle:
            for ours in ours_names:
                params[ours].copy_(handle.get_tensor(source_of[ours]))
    for ours, src in fill.items():
        params[ours].copy_(params[src])
    return sorted(source_of) + sorted(fill)


# -- Keye checkpoints ---------------------------------------------------------------------
def hf_config_dict(cfg: KeyeConfig) -> dict:
    """config.json: the released model's field names, plus our own typed config under ``keyetron``."""
    v, t = cfg.vision, cfg.text
    return {
        "architectures": ["KeyeVL1_5ForConditionalGeneration"],
        "model_type": "KeyeVL1_5",
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_heads,
        "num_key_value_heads": t.num_kv_heads,
        "head_dim": t.head_dim,
        "intermediate_size": t.intermediate_size,
        "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": t.rope_theta,
        "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_section)},
        "tie_word_embeddings": t.tie_word_embeddings,
        "hidden_act": "silu",
        "image_token_id": cfg.image_token_id,
        "video_token_id": cfg.video_token_id,
        "vision_start_token_id": cfg.vision_start_token_id,
        "vision_end_token_id": cfg.vision_end_token_id,
        "vision_config": {
            "hidden_size": v.hidden_size,
            "num_hidden_layers": v.num_layers,
            "num_attention_heads": v.num_heads,
            "intermediate_size": v.intermediate_size,
            "patch_size": v.patch_size,
            "num_channels": v.num_channels,
            "image_size": v.position_table_side * v.patch_size,
            "layer_norm_eps": v.layer_norm_eps,
            "hidden_act": "gelu_pytorch_tanh",
            "spatial_merge_size": cfg.projector.merge_size,
        },
        "keyetron": to_dict(cfg),
    }


def config_from_hf(path: str | Path) -> KeyeConfig:
    """The model config of a checkpoint folder: ours if present, else read from the released fields."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ConfigError(f"{file}: not found; pass --config NAME to say which architecture the checkpoint has")
    raw = json.loads(file.read_text())
    if "keyetron" in raw:
        return from_dict(KeyeConfig, raw["keyetron"], f"{file}:keyetron")
    text = raw.get("text_config", raw)
    vis = raw.get("vision_config")
    if vis is None:
        raise ConfigError(f"{file}: no vision_config; this is not a Keye-VL checkpoint")
    try:
        section = (text.get("rope_scaling") or text.get("rope_parameters") or {}).get("mrope_section", [16, 24, 24])
        vision = VisionConfig(
            hidden_size=vis["hidden_size"], num_layers=vis["num_hidden_layers"], num_heads=vis["num_attention_heads"],
            intermediate_size=vis["intermediate_size"], patch_size=vis.get("patch_size", 14),
            num_channels=vis.get("num_channels", 3),
            position_table_side=vis.get("image_size", 384) // vis.get("patch_size", 14),
            layer_norm_eps=vis.get("layer_norm_eps", 1e-6),
        )
        llm = TextConfig(
            vocab_size=text["vocab_size"], hidden_size=text["hidden_size"], num_layers=text["num_hidden_layers"],
            num_heads=text["num_attention_heads"], num_kv_heads=text.get("num_key_value_heads", text["num_attention_heads"]),
            head_dim=text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"],
            intermediate_size=text["intermediate_size"], rms_norm_eps=text.get("rms_norm_eps", 1e-6),
            rope_theta=float(text.get("rope_theta", 1e6)), mrope_section=tuple(section),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
        )
    except KeyError as err:
        raise ConfigError(f"{file}: missing field {err} needed to build the model") from err
    except ValueError as err:
        raise ConfigError(f"{file}: {err}") from err
    return KeyeConfig(
        vision=vision, projector=ProjectorConfig(merge_size=vis.get("spatial_merge_size", 2)), text=llm,
        image_token_id=raw.get("image_token_id", 151655), video_token_id=raw.get("video_token_id", 151656),
        name=Path(path).name,
    )


def save_hf_checkpoint(model: nn.Module, out_dir: str | Path, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write safetensors shards named as the released model, an index when sharded, and config.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():  # tied parameters appear once, under their first name
        if id(p) in seen:
            continue
        seen.add(id(p))
        tensors[to_hf_name(name)] = p.detach().cpu().contiguous()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    for stale in list(out_dir.glob("model*.safetensors")) + [out_dir / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        save_tensors(shards[0], out_dir / SINGLE_FILE, metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_tensors(shard, out_dir / fname, metadata={"format": "pt"})
            weight_map.update({name: fname for name in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
    if hasattr(model, "cfg") and isinstance(model.cfg, KeyeConfig):
        (out_dir / "config.json").write_text(json.dumps(hf_config_dict(model.cfg), indent=2))
    return out_dir


def load_hf_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load a full Keye-VL-1.5 checkpoint (released or ours) into ``model``, strictly."""
    tied = {"llm.lm_head.weight": "llm.embed_tokens.weight"} if model.llm.lm_head.weight is model.llm.embed_tokens.weight else {}
    load_into(model, path, from_hf_name, fill=tied)


def load_hf_model(path: str | Path, device="cpu", dtype: torch.dtype | None = None, cfg: KeyeConfig | None = None):
    """Build a model from a checkpoint folder without initialising weights first."""
    from keyetron.model.keye import KeyeVLModel

    cfg = cfg or config_from_hf(path)
    with torch.device("meta"):
        model = KeyeVLModel(cfg)
    model = model.to_empty(device=device)
    if cfg.text.tie_word_embeddings:
        model.llm.lm_head.weight = model.llm.embed_tokens.weight
    load_hf_checkpoint(model, path)
    return model.to(dtype) if dtype is not None else model


def init_vision_from_siglip(model: nn.Module, path: str | Path) -> list[str]:
    """Initialise the ViT from a SigLIP checkpoint (``vision_model.*``; the text tower and head are skipped)."""

    def rename(name: str) -> str | None:
        if not name.startswith("vision_model.") or name.startswith("vision_model.head."):
            return None  # text tower, logit scale/bias, pooling head
        name = name[len("vision_model."):].replace("encoder.layers.", "layers.", 1)
        return None if name.startswith("embeddings.packing_position_embedding.") else name

    return ["vit." + n for n in load_into(model.vit, path, rename)]


def init_llm_from_qwen3(model: nn.Module, path: str | Path) -> list[str]:
    """Initialise the LLM from a Qwen3 checkpoint (``model.*``, ``lm_head``); a tied head is copied from the embedding."""

    def rename(name: str) -> str:
        if name.startswith("lm_head."):
            return name
        return name[len("model."):] if name.startswith("model.") else f"<unknown>{name}"

    config = Path(path) / "config.json"
    tied = config.is_file() and json.loads(config.read_text()).get("tie_word_embeddings", False)
    fill = {"lm_head.weight": "embed_tokens.weight"} if tied else None
    loaded = load_into(model.llm, path, rename, fill=fill)
    return ["llm." + n for n in loaded]
