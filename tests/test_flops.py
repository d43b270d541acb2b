"""FLOP counting: the Qwen3-8B anchors of the performance reference, per-document and per-frame
billing, padding, frozen-module multipliers, and the analytic parameter counts."""
import dataclasses

import pytest
import torch

from keyetron.batch import IGNORE_INDEX, Document, PackedBatch
from keyetron.data.packing import padding_document
from keyetron.model import build_model, load_model_config, parameter_counts
from keyetron.flops import (
    FlopCount,
    FlopCounter,
    frame_patches,
    linear_multipliers,
    mfu,
    parameter_counts_from_config,
    peak_flops,
)

K = 1024


@pytest.fixture(scope="module")
def keye8b():
    return FlopCounter(load_model_config("keye-8b"))


# -- parameter counts ----------------------------------------------------------------------

# The meta device builds the same modules without allocating (small's random init alone takes seconds).
@pytest.mark.parametrize("name, device", [("tiny", "cpu"), ("small", "meta"), ("keye-8b", "meta")])
def test_analytic_parameter_counts_equal_the_built_model(name, device):
    cfg = load_model_config(name)
    assert parameter_counts_from_config(cfg) == parameter_counts(build_model(cfg, device=device))


def test_analytic_parameter_counts_with_tied_embeddings(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, text=dataclasses.replace(tiny_cfg.text, tie_word_embeddings=True))
    assert parameter_counts_from_config(cfg) == parameter_counts(build_model(cfg, device="meta"))
    # The head is still a matmul on every head token even when its weight is the embedding's.
    counter = FlopCounter(cfg)
    assert counter.count([10]).llm_linear == FlopCounter(tiny_cfg).count([10]).llm_linear


# -- Qwen3-8B anchors (performance reference) ----------------------------------------------

def test_qwen3_8b_linear_flops_per_token(keye8b):
    assert keye8b.count([1]).llm_linear == pytest.approx(45.4e9, rel=2e-3)


@pytest.mark.parametrize("length, gflop", [(2 * K, 1.8), (8 * K, 7.2), (32 * K, 29), (128 * K, 116)])
def test_qwen3_8b_attention_flops_per_token_grow_with_document_length(keye8b, length, gflop):
    assert keye8b.count([length]).llm_attention / length / 1e9 == pytest.approx(gflop, rel=0.01)


def test_one_128k_document_costs_about_3_4_rows_of_64_2k_documents(keye8b):
    ratio = keye8b.count([128 * K]).total / keye8b.count([2 * K] * 64).total
    assert ratio == pytest.approx(3.4, rel=0.01)


def test_attention_is_counted_per_document_not_per_row(keye8b):
    split, whole = keye8b.count([2 * K] * 4), keye8b.count([8 * K])
    assert split.llm_linear == whole.llm_linear
    assert whole.llm_attention == 4 * split.llm_attention


def test_lm_head_is_billed_only_on_head_tokens(keye8b):
    t = keye8b.cfg.text
    all_tokens, few = keye8b.count([100]), keye8b.count([100], head_tokens=10)
    assert all_tokens.llm_linear - few.llm_linear == 6 * t.vocab_size * t.hidden_size * 90


# -- ViT and projector ----------------------------------------------------------------------

def test_vit_flops_per_frame(keye8b):
    v = keye8b.cfg.vision
    got = keye8b.count([], frame_patches=[64])
    assert got.vit_attention == 12 * v.num_layers * v.hidden_size * 64**2
    assert got.vit_linear == 6 * keye8b.vit_params * 64
    assert got.projector == 6 * keye8b.projector_params * 16  # 2x2 merge
    assert got.llm == 0  # ViT work is billed per patch, never per decoder token


def test_video_grid_is_counted_frame_by_frame(keye8b):
    assert frame_patches(torch.tensor([[4, 8, 8], [1, 4, 6]])) == [64] * 4 + [24]
    video = keye8b.count([], frame_patches([(4, 8, 8)]))
    assert video == keye8b.count([], [64] * 4)
    assert video.vit_attention == keye8b.count([], [256]).vit_attention // 4


def test_frame_patches_must_merge(keye8b):
    with pytest.raises(ValueError, match="merge_size"):
        keye8b.count([], [6])


# -- packed batches --------------------------------------------------------------------------

def _doc(n: int, loss_tokens: int, sample_id: str, grid=None) -> Document:
    targets = torch.full((n,), IGNORE_INDEX)
    targets[:loss_tokens] = 1
    pixels = None
    if grid is not None:
        grid = torch.tensor(grid)
        pixels = torch.zeros(int(grid.prod(dim=1).sum()), 3, 14, 14)
    return Document(torch.ones(n, dtype=torch.long), targets, torch.zeros(3, n, dtype=torch.long),
                    pixels, grid, sample_id)


def test_count_batch_reads_documents_frames_and_loss_tokens(tiny_cfg):
    counter = FlopCounter(tiny_cfg)
    batch = PackedBatch.from_documents([
        _doc(30, 5, "a", grid=[[2, 4, 4], [1, 2, 4]]), _doc(12, 12, "b"), padding_document(20)])
    assert counter.count_batch(batch) == counter.count([30, 12], [16, 16, 8], head_tokens=17)


def test_padding_counts_zero(tiny_cfg):
    counter = FlopCounter(tiny_cfg)
    real = PackedBatch.from_documents([_doc(12, 12, "a")])
    padded = PackedBatch.from_documents([_doc(12, 12, "a"), padding_document(500)])
    assert counter.count_batch(padded) == counter.count_batch(real)
    assert counter.count([]) == FlopCount()


def test_counts_add_over_micro_batches(tiny_cfg):
    counter = FlopCounter(tiny_cfg)
    a, b = counter.count([10], [16]), counter.count([7, 3])
    assert (a + b).total == a.total + b.total
    assert sum([a, b]) == a + b


# -- frozen modules --------------------------------------------------------------------------

@pytest.mark.parametrize("trainable, expected", [
    ({"vit": True, "projector": True, "llm": True}, {"vit": 6, "projector": 6, "llm": 6}),
    ({"vit": False, "projector": True, "llm": True}, {"vit": 2, "projector": 6, "llm": 6}),
    ({"vit": False, "projector": False, "llm": True}, {"vit": 2, "projector": 2, "llm": 6}),
    ({"vit": True, "projector": False, "llm": False}, {"vit": 6, "projector": 4, "llm": 4}),
    ({"vit": False, "projector": True, "llm": False}, {"vit": 2, "projector": 6, "llm": 4}),
    ({"vit": False, "projector": False, "llm": False}, {"vit": 2, "projector": 2, "llm": 2}),
])
def test_frozen_multiplier_depends_on_whether_gradients_flow_through(trainable, expected):
    assert linear_multipliers(trainable) == expected


def test_frozen_modules_bill_fewer_passes(tiny_cfg):
    full = FlopCounter(tiny_cfg).count([40], [16])
    frozen_vit = FlopCounter(tiny_cfg, {"vit": False}).count([40], [16])
    assert frozen_vit.vit_linear * 3 == full.vit_linear
    assert frozen_vit.vit_attention * 3 == full.vit_attention  # forward only
    assert frozen_vit.llm == full.llm and frozen_vit.projector == full.projector
    # Frozen LLM under a trainable projector: linear fwd + input grad, attention backward in full.
    frozen_llm = FlopCounter(tiny_cfg, {"llm": False}).count([40], [16])
    assert frozen_llm.llm_linear * 3 == full.llm_linear * 2
    assert frozen_llm.llm_attention == full.llm_attention


def test_unknown_trainable_key_is_an_error(tiny_cfg):
    with pytest.raises(ValueError, match=r"unknown module.*'vision'.*allowed keys"):
        FlopCounter(tiny_cfg, {"vision": False})


# -- MFU and peaks ---------------------------------------------------------------------------

def test_mfu():
    assert mfu(989e12 * 0.4 * 8 * 2.0, seconds=2.0, n_devices=8, peak_flops_per_device=989e12) == pytest.approx(0.4)
    with pytest.raises(ValueError):
        mfu(1.0, seconds=0.0, n_devices=1, peak_flops_per_device=1.0)


@pytest.mark.parametrize("name, dtype, tf32, expected", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, False, 989e12),
    ("NVIDIA H100 80GB HBM3", torch.float32, True, 494.5e12),
    ("NVIDIA H100 80GB HBM3", torch.float32, False, 67e12),
    ("NVIDIA H100 PCIe", torch.bfloat16, False, 756e12),
    ("NVIDIA H200", torch.bfloat16, False, 989e12),
    ("NVIDIA A100-SXM4-80GB", torch.float16, False, 312e12),
    ("NVIDIA H100 NVL", torch.bfloat16, False, None),  # recognised, not tabulated
    ("NVIDIA GH200 480GB", torch.bfloat16, False, None),
    ("NVIDIA RTX A1000", torch.bfloat16, False, None),
    ("cpu", torch.float32, False, None),
    ("NVIDIA H100 80GB HBM3", torch.float64, False, None),
])
def test_peak_flops_table(name, dtype, tf32, expected):
    assert peak_flops(name, dtype, tf32=tf32) == expected


def test_peak_flops_override_wins():
    assert peak_flops("cpu", torch.float32, override=1e12) == 1e12
    with pytest.raises(ValueError):
        peak_flops("cpu", torch.float32, override=0)
