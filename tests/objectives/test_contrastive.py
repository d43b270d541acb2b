"""Stage 0: the sigmoid loss equals transformers', data parallel equals one process, and training learns."""
import dataclasses
import math

import pytest
import torch
import torch.distributed as dist

from distributed import run_ranks
from keyetron.config import ConfigError
from keyetron.data.dataset import MediaConfig
from keyetron.data.demo import make_demo
from keyetron.model import load_model_config
from keyetron.model.siglip_text import load_text_config
from keyetron.data.pairs import CaptionTokenizer, ContrastiveBatch, ContrastiveBatchBuilder, read_image_captions
from keyetron.objectives.contrastive import ContrastiveObjective, build_contrastive_objective
from keyetron.objectives.sigmoid_loss import distributed_sigmoid_loss_sum, siglip_sigmoid_loss

TINY_MEDIA = MediaConfig(image_max_tokens=16)  # at most 64 ViT patches per image: fast on CPU


@pytest.fixture(scope="module")
def demo_pairs(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    make_demo(out, train_size=40, eval_size=4)
    return read_image_captions(out / "train.jsonl")


def tiny_objective(dtype=torch.float64, freeze_text=False, seed=0, logit_bias=None):
    objective = build_contrastive_objective(load_model_config("tiny").vision, load_text_config("tiny"),
                                            freeze_text=freeze_text, seed=seed, dtype=dtype)
    if logit_bias is not None:  # SigLIP's -10 makes every negative's loss tiny; 0 gives them weight
        with torch.no_grad():
            objective.logit_bias.fill_(logit_bias)
    return objective


def test_sigmoid_loss_equals_transformers_siglip_loss():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.SiglipConfig(
        text_config=dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           patch_size=14, image_size=28))
    ref = transformers.SiglipModel(cfg).double().eval()
    with torch.no_grad():
        ref.logit_scale.fill_(1.7)
        ref.logit_bias.fill_(-2.3)
        out = ref(input_ids=torch.randint(0, 50, (5, 8)), pixel_values=torch.randn(5, 3, 28, 28, dtype=torch.float64),
                  return_loss=True)
    # Embeddings scaled on purpose: the loss normalises them itself.
    ours = siglip_sigmoid_loss(3 * out.image_embeds, 0.5 * out.text_embeds, ref.logit_scale, ref.logit_bias)
    torch.testing.assert_close(ours, out.loss, rtol=0, atol=1e-14)


def test_sigmoid_loss_definition_on_a_two_pair_batch():
    img = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    txt = torch.tensor([[3.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    scale, bias = torch.tensor([0.0], dtype=torch.float64), torch.tensor([-1.0], dtype=torch.float64)
    cos = torch.tensor([[1.0, 2**-0.5], [0.0, 2**-0.5]], dtype=torch.float64)
    labels = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)
    expected = -torch.nn.functional.logsigmoid(labels * (cos - 1.0)).sum() / 2
    torch.testing.assert_close(siglip_sigmoid_loss(img, txt, scale, bias), expected, rtol=0, atol=1e-15)
    # The local case of the distributed sum (no process group).
    torch.testing.assert_close(distributed_sigmoid_loss_sum(img, txt, scale, bias), 2 * expected, rtol=0, atol=1e-15)


def union_batch(pairs_per_rank=(3, 2)):
    """A deterministic random batch of native-resolution images (different grids) and captions."""
    gen = torch.Generator().manual_seed(11)
    n = sum(pairs_per_rank)
    grids = torch.tensor([[1, int(torch.randint(2, 6, (1,), generator=gen)), int(torch.randint(2, 6, (1,), generator=gen))]
                          for _ in range(n)])
    pixels = torch.randn(int(grids.prod(1).sum()), 3, 14, 14, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, 151936, (n, 64), generator=gen)
    return ContrastiveBatch(pixels, grids, ids)


def rank_slice(batch: ContrastiveBatch, start: int, stop: int) -> ContrastiveBatch:
    sizes = batch.vision_grid_thw.prod(1)
    p0, p1 = int(sizes[:start].sum()), int(sizes[:stop].sum())
    return ContrastiveBatch(batch.pixel_values[p0:p1], batch.vision_grid_thw[start:stop], batch.input_ids[start:stop])


def _dp_loss_and_grads(rank, world, pairs_per_rank):
    objective = tiny_objective(logit_bias=0.0)
    objective.objective.negatives_group = dist.group.WORLD
    start = sum(pairs_per_rank[:rank])
    local = rank_slice(union_batch(pairs_per_rank), start, start + pairs_per_rank[rank])
    out = objective.loss(local)
    count = torch.tensor(out.count)
    dist.all_reduce(count)  # the step's global pair count
    (out.loss_sum / count).backward()
    total = out.loss_sum.detach().clone()
    dist.all_reduce(total)
    grads = {}
    for name, p in objective.named_parameters():
        dist.all_reduce(p.grad)  # the data-parallel SUM of gradients
        grads[name] = p.grad
    return float(total / count), grads


@pytest.mark.parametrize("pairs_per_rank", [(3, 2), (2, 2)])
def test_data_parallel_loss_and_gradients_equal_one_process_over_the_union_batch(pairs_per_rank):
    objective = tiny_objective(logit_bias=0.0)
    loss = objective.loss(union_batch(pairs_per_rank))
    mean = loss.loss_sum / loss.count
    mean.backward()
    for loss_r, grads in run_ranks(2, _dp_loss_and_grads, pairs_per_rank):
        assert loss_r == pytest.approx(float(mean.detach()), rel=1e-13)
        for name, p in objective.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-12, atol=1e-13, msg=name)
    # Negatives from the other rank matter: local-only losses would differ.
    with torch.no_grad():
        local = sum(float(tiny_objective(logit_bias=0.0).loss(rank_slice(union_batch(pairs_per_rank), a, b)).loss_sum)
                    for a, b in ((0, pairs_per_rank[0]), (pairs_per_rank[0], sum(pairs_per_rank))))
    assert abs(local / sum(pairs_per_rank) - float(mean.detach())) > 0.1


def test_captions_and_batches_from_the_demo_dataset(demo_pairs):
    by_id = {p.sample_id: p for p in demo_pairs}
    captions = [p for i, p in by_id.items() if "shape_caption" in i]
    assert captions and all(" on a light background." in p.caption or "shapes:" in p.caption for p in captions)
    assert by_id["train-colour-00000"].caption == "What colour is the shape? purple"
    assert not any("ball" in i or "text-" in i for i in by_id)  # videos and text-only samples are skipped
    tok = CaptionTokenizer.for_tower(load_text_config("tiny"))
    batch = ContrastiveBatchBuilder(tok, TINY_MEDIA).build(demo_pairs[:5])
    assert batch.input_ids.shape == (5, 64) and batch.num_pairs == ContrastiveObjective.count(None, batch) == 5
    assert batch.vision_grid_thw[:, 0].tolist() == [1] * 5 and (batch.vision_grid_thw[:, 1:] % 2 == 0).all()
    assert batch.num_tokens == int(batch.vision_grid_thw.prod(1).sum()) <= 5 * 64
    first = tok([demo_pairs[0].caption])[0]
    n = len(tok._qwen.encode(demo_pairs[0].caption))
    assert (first[n:] == tok.pad_id).all() and (first[:n] != tok.pad_id).all()
    long = tok(["word " * 200])[0]
    assert long[-1] == tok.pad_id and (long[:-1] != tok.pad_id).all()  # truncated, end-of-text kept


def test_tokenizer_and_tower_mismatches_are_config_errors(tmp_path):
    transformers = pytest.importorskip("transformers")
    text = load_text_config("tiny")
    with pytest.raises(ConfigError, match="vocab_size 1000"):
        CaptionTokenizer.for_tower(dataclasses.replace(text, vocab_size=1000))
    with pytest.raises(ConfigError, match="projection_size: 32"):
        build_contrastive_objective(load_model_config("tiny").vision, dataclasses.replace(text, projection_size=16))
    with pytest.raises(ConfigError, match="no tokenizer transformers can load"):
        CaptionTokenizer(tmp_path)
    # A tokenizer folder transformers can load offline (a real SigLIP checkpoint has one).
    from keyetron.data.tokenizer import bundled_tokenizer_dir

    transformers.PreTrainedTokenizerFast(tokenizer_file=str(bundled_tokenizer_dir() / "tokenizer.json"),
                                         pad_token="<|endoftext|>").save_pretrained(tmp_path / "tok")
    ids = CaptionTokenizer.for_tower(text, tmp_path / "tok")(["a red circle"])
    assert ids.shape == (1, 64) and ids[0, :3].tolist() == [64, 2518, 12671] and (ids[0, 3:] == 151643).all()


def _train(objective, batch, steps, lr=3e-3):
    params = [p for p in objective.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses, grads = [], {}
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        out = objective.loss(batch)
        (out.loss_sum / out.count).backward()
        if step == 0:
            grads = {n: p.grad for n, p in objective.named_parameters()}
        opt.step()
        losses.append(float(out.loss_sum.detach() / out.count))
    return losses, grads


def test_adamw_steps_on_demo_images_learn_which_caption_goes_with_which_image(demo_pairs):
    tok = CaptionTokenizer.for_tower(load_text_config("tiny"))
    batch = ContrastiveBatchBuilder(tok, TINY_MEDIA).build(demo_pairs[:8])
    objective = tiny_objective(dtype=torch.float32)
    losses, grads = _train(objective, batch, steps=100)
    # With one logit for every cell (embeddings that ignore their input) the best loss is
    # -log(1/n) - (n-1) log((n-1)/n) = 3.01 for n = 8: only matching pairs get below it.
    n = batch.num_pairs
    constant_logit_optimum = -(math.log(1 / n) + (n - 1) * math.log((n - 1) / n))
    assert losses[-1] < constant_logit_optimum - 0.5 < losses[0], losses[::10]
    for part in ("vit.layers.0.", "vit.embeddings.", "pool_head.", "text_tower.layers.0.", "text_tower.head.",
                 "logit_scale", "logit_bias"):
        named = [g for n, g in grads.items() if n.startswith(part)]
        assert named and all(g is not None and g.abs().sum() > 0 for g in named), part


def test_a_frozen_text_tower_stays_put_while_the_vit_learns(demo_pairs):
    tok = CaptionTokenizer.for_tower(load_text_config("tiny"))
    batch = ContrastiveBatchBuilder(tok, TINY_MEDIA).build(demo_pairs[:8])
    objective = tiny_objective(dtype=torch.float32, freeze_text=True)
    before = {n: p.detach().clone() for n, p in objective.named_parameters()}
    losses, grads = _train(objective, batch, steps=6)
    assert losses[-1] < losses[0], losses
    for n, p in objective.named_parameters():
        if n.startswith("text_tower."):
            assert grads[n] is None and torch.equal(p, before[n]), n
        else:
            assert not torch.equal(p, before[n]), n
