"""The rollout engine: its log-probs are the training forward's, its samples are reproducible.

The central check packs every (prompt + response) document with an unrelated document and runs
the model's one forward (``KeyeVLModel.forward`` -> ``ModelOutput.token_logprobs``, the path every
objective trains through): the log-prob of each sampled token must equal what the engine
returned while generating it with its KV cache, for text, image, multi-image and Slow-Fast
video prompts (fp64: 1e-9).
"""
from __future__ import annotations

import pytest
import torch

from keyetron.batch import PackedBatch
from keyetron.model import build_model
from keyetron.model.generate import greedy_generate
from keyetron.positions import compute_position_ids, llm_grids
from keyetron.rollout import SamplingParams, generate, rollout_document, sampling_probs
from keyetron.rollout.sampling import choose
from synthetic import make_document

TOL = 1e-9


def prompts(cfg, dtype=torch.float64):
    gen = torch.Generator().manual_seed(3)
    return [
        make_document(cfg, gen, text=7, sample_id="text", dtype=dtype),
        make_document(cfg, gen, text=4, images=[(4, 6)], sample_id="image", dtype=dtype),
        make_document(cfg, gen, text=3, images=[(4, 4), (2, 6)], sample_id="multi-image", dtype=dtype),
        make_document(cfg, gen, text=3, video=[(6, 6), (2, 4), (2, 4), (6, 6)], sample_id="slow-fast video",
                      dtype=dtype),
    ]


@pytest.fixture(scope="module")
def model():
    from keyetron.model import load_model_config

    m = build_model(load_model_config("tiny"), dtype=torch.float64, seed=0)
    with torch.no_grad():  # livelier logits than the 0.02 init, so sampling has real choices
        m.llm.lm_head.weight.mul_(20)
    return m.eval()


def training_logprobs(model, docs):
    """Per document, log p(target) of its target tokens from the training forward over one packed row."""
    batch = PackedBatch.from_documents(docs)
    out = model(batch)
    logprobs = out.token_logprobs()
    return [logprobs[out.documents == i] for i in range(len(docs))]


def test_rollout_logprobs_equal_the_training_forward_for_text_image_and_video_prompts(model):
    cfg = model.cfg
    docs = prompts(cfg)
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=6)
    results, stats = generate(model, docs, params, stop_ids=[], samples=2, seed=11)
    assert stats.new_tokens == len(docs) * 2 * 6 and stats.sequences == 8
    rollouts = [r for per_prompt in results for r in per_prompt]
    assert all(len(r.token_ids) == 6 and not r.stopped for r in rollouts)
    train_docs = [rollout_document(docs[r.prompt_index], r.token_ids) for r in rollouts]
    # The positions generation used are the data pipeline's for the same tokens.
    for r, d in zip(rollouts, train_docs):
        prompt = docs[r.prompt_index]
        blocks = llm_grids(prompt.vision_grid_thw, cfg.projector.merge_size) if prompt.has_vision else []
        expected = compute_position_ids(d.input_ids, blocks, (cfg.image_token_id, cfg.video_token_id))
        assert torch.equal(d.position_ids, expected), r.prompt_index
    other = make_document(cfg, torch.Generator().manual_seed(9), text=5, images=[(2, 2)], sample_id="other")
    got = training_logprobs(model, [other, *train_docs])[1:]
    for r, lp in zip(rollouts, got):
        assert lp.shape == (6,)
        torch.testing.assert_close(torch.tensor(r.logprobs, dtype=torch.float64), lp, rtol=0, atol=TOL)
    # Two samples of one prompt share the prefill but draw their own tokens.
    assert any(results[p][0].token_ids != results[p][1].token_ids for p in range(len(docs)))


def test_greedy_decoding_with_the_cache_equals_the_cacheless_greedy_loop(model):
    docs = prompts(model.cfg)
    reference = greedy_generate(model, docs, max_new_tokens=8, stop_ids=[])
    results, _ = generate(model, docs, SamplingParams(temperature=0, max_new_tokens=8), stop_ids=[])
    assert [r[0].token_ids for r in results] == reference


def test_a_response_is_the_same_whatever_else_is_in_the_batch(model):
    docs = prompts(model.cfg)
    params = SamplingParams(temperature=0.8, top_k=50, max_new_tokens=5)
    alone, _ = generate(model, [docs[2]], params, stop_ids=[], samples=3, seed=4)
    together, _ = generate(model, [docs[3], docs[0], docs[2]], params, stop_ids=[], samples=3, seed=4)
    for j in range(3):
        assert alone[0][j].token_ids == together[2][j].token_ids
        torch.testing.assert_close(alone[0][j].logprobs, together[2][j].logprobs, rtol=0, atol=TOL)
    other_seed, _ = generate(model, [docs[2]], params, stop_ids=[], samples=3, seed=5)
    assert [r.token_ids for r in other_seed[0]] != [r.token_ids for r in alone[0]]


def test_a_sequence_stops_at_its_stop_id_and_keeps_it(model):
    docs = prompts(model.cfg)[:2]
    greedy = SamplingParams(temperature=0, max_new_tokens=8)
    free, _ = generate(model, docs, greedy, stop_ids=[])
    stop = free[0][0].token_ids[2]
    first = free[0][0].token_ids.index(stop)
    stopped, stats = generate(model, docs, greedy, stop_ids=[stop])
    assert stopped[0][0].token_ids == free[0][0].token_ids[:first + 1] and stopped[0][0].stopped
    other = free[1][0].token_ids
    cut = other.index(stop) + 1 if stop in other else len(other)
    assert stopped[1][0].token_ids == other[:cut]
    assert stats.new_tokens == first + 1 + cut


def test_nothing_of_the_previous_policy_survives_a_weight_update(model):
    import copy

    m = copy.deepcopy(model)
    docs = prompts(m.cfg)
    params = SamplingParams(temperature=1.0, max_new_tokens=4)
    before, _ = generate(m, docs, params, stop_ids=[], seed=1)
    with torch.no_grad():  # an "optimizer step" on the ViT, the projector and the LLM
        gen = torch.Generator().manual_seed(0)
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.05)
    after, _ = generate(m, docs, params, stop_ids=[], seed=1)
    rollouts = [r[0] for r in after]
    got = training_logprobs(m, [rollout_document(docs[r.prompt_index], r.token_ids) for r in rollouts])
    for r, lp in zip(rollouts, got):
        torch.testing.assert_close(torch.tensor(r.logprobs, dtype=torch.float64), lp, rtol=0, atol=TOL)
    assert any(a[0].logprobs != b[0].logprobs for a, b in zip(before, after))


def test_bf16_rollout_logprobs_are_close_to_the_bf16_training_forward(model):
    """bf16 weights: both paths round each matmul to bf16 (relative error up to 2^-8 per product,
    accumulated over 2 layers and a softmax), so log-probs agree to a few 1e-2; measured ~1e-2."""
    m = build_model(model.cfg, dtype=torch.float64, seed=0)
    with torch.no_grad():
        m.llm.lm_head.weight.mul_(20)
    m = m.to(torch.bfloat16).eval()
    docs = prompts(m.cfg, dtype=torch.bfloat16)
    results, _ = generate(m, docs, SamplingParams(temperature=1.0, max_new_tokens=4), stop_ids=[], seed=2)
    rollouts = [r[0] for r in results]
    got = training_logprobs(m, [rollout_document(docs[r.prompt_index], r.token_ids) for r in rollouts])
    for r, lp in zip(rollouts, got):
        assert lp.dtype == torch.float32
        torch.testing.assert_close(torch.tensor(r.logprobs), lp, rtol=0, atol=0.1)


# ---------------------------------------------------------------- sampling
def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=torch.float64))
    keep = lambda **kw: (sampling_probs(logits, SamplingParams(**kw)) > 0).nonzero().flatten().tolist()  # noqa: E731
    assert keep(top_k=2) == [0, 1]
    assert keep(top_p=0.45) == [0]  # the top token alone reaches 0.45
    assert keep(top_p=0.51) == [0, 1]
    assert keep(top_p=0.86) == [0, 1, 2, 3]
    assert keep(top_k=3, top_p=0.8) == [0, 1]  # top-p over the renormalised top-3: 0.59 + 0.24 >= 0.8
    torch.testing.assert_close(sampling_probs(logits, SamplingParams(top_k=2)),
                               torch.tensor([5 / 7, 2 / 7, 0, 0, 0], dtype=torch.float64))
    hot = sampling_probs(logits, SamplingParams(temperature=2.0))
    torch.testing.assert_close(hot, torch.softmax(logits / 2, 0))


def test_sampling_draws_tokens_with_their_probabilities():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))
    params = SamplingParams(temperature=1.0)
    counts = torch.zeros(3)
    for i in range(3000):
        counts[choose(logits, params, torch.Generator().manual_seed(i))] += 1
    # 3 sigma of a binomial(3000, p) is at most 3 * sqrt(3000 * 0.25) = 82 draws
    assert (counts - torch.tensor([1500, 900, 600])).abs().max() < 82, counts
    assert choose(logits, SamplingParams(temperature=0), None) == 0


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1),
                                 dict(max_new_tokens=0)])
def test_bad_sampling_parameters_are_refused_naming_the_field(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)
