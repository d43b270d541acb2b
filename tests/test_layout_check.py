"""``ParallelConfig.check``: a layout the model or the world cannot take is one ConfigError naming
the recipe key, its value, the model's numbers and what to choose, raised before any process
group exists; it agrees with the layout code that would refuse the same layout later."""
import dataclasses

import pytest

from keyetron.config import ConfigError
from keyetron.model import load_model_config
from keyetron.parallel.config import ParallelConfig
from keyetron.parallel.pipeline import split_layers
from keyetron.parallel.tensor_parallel import kv_heads_replicated
from keyetron.parallel.topology import ParallelDims


def with_text(cfg, **text):
    return dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, **text))


@pytest.mark.parametrize("text, layout, grad_accum, message", [
    (dict(), dict(tp=3), 1, "parallel.tp=3 does not divide the attention heads: model config 'tiny' has num_heads 4, "
                            "num_kv_heads 2, vocab_size 151936; choose parallel.tp from 1, 2 or 4"),
    (dict(num_heads=12, num_kv_heads=4), dict(tp=6), 1,
     "parallel.tp=6 and num_kv_heads 4: one must divide the other (KV heads are split over tp, or each is replicated "
     "on tp/num_kv_heads ranks): model config 'tiny' has num_heads 12, num_kv_heads 4, vocab_size 151936; choose "
     "parallel.tp from 1, 2 or 4"),
    (dict(vocab_size=151937), dict(tp=2), 1,
     "parallel.tp=2 does not divide the vocabulary (the embedding and head are split on it): model config 'tiny' has "
     "num_heads 4, num_kv_heads 2, vocab_size 151937; choose parallel.tp from 1"),
    (dict(), dict(pp=2, schedule="interleaved", virtual_stages=2), 2,
     "parallel.pp=2 x parallel.virtual_stages=2 = 4 pipeline stages for the 2 decoder layers of model config 'tiny' "
     "(num_layers 2): every stage needs a layer; choose pp x virtual_stages <= 2"),
    (dict(num_layers=4), dict(pp=2, stage_layers=[[0, 1], [1, 2, 3]]), 2,
     "parallel.stage_layers [[0, 1], [1, 2, 3]]: give 2 lists (pp x virtual_stages) of decoder layers that together "
     "hold 0..3 of model config 'tiny' once, or leave it out (balanced)"),
    (dict(), dict(pp=2, sharding="fsdp2"), 2,
     "parallel.sharding=fsdp2 with parallel.pp=2: FSDP2 with pipeline stages is not supported yet; use "
     "parallel.sharding zero1, zero2 or none, or parallel.pp=1"),
    (dict(), dict(pp=2), 1,
     "train.grad_accum=1 with parallel.pp=2: a pipeline of 2 stages needs at least 2 packed rows (micro-batches) per "
     "step and data-parallel rank; set train.grad_accum to 2 or more, or lower parallel.pp"),
    (dict(num_layers=4), dict(pp=2, schedule="interleaved", virtual_stages=2), 5,
     "train.grad_accum=5 with parallel.schedule=interleaved and parallel.pp=2: the interleaved schedule needs a "
     "multiple of grad_accum // pp = 2 micro-batches; set train.grad_accum to a multiple of 2 (e.g. 4)"),
])
def test_a_layout_the_model_cannot_take_names_the_key_the_numbers_and_the_choice(tiny_cfg, text, layout, grad_accum,
                                                                                 message):
    with pytest.raises(ConfigError) as err:
        ParallelConfig(**layout).check(with_text(tiny_cfg, **text), grad_accum)
    assert str(err.value) == message


@pytest.mark.parametrize("layout, world, message", [
    (dict(tp=2, cp=2), 6, "parallel.pp x cp x tp = 1 x 2 x 2 = 4 does not divide the 6 processes; start a multiple "
                          "of 4 processes or choose a layout whose product divides 6"),
    (dict(tp=2, dp=2), 8, "parallel.dp=2 x (parallel.pp x cp x tp = 1 x 1 x 2 = 2) needs 4 processes, the world has "
                          "8; set parallel.dp=0 (dp is then what the world leaves) or start 4 processes"),
])
def test_a_layout_the_world_cannot_take_says_how_many_processes_it_needs(tiny_cfg, layout, world, message):
    with pytest.raises(ConfigError) as err:
        ParallelConfig(**layout).check(tiny_cfg, 1, world_size=world)
    assert str(err.value) == message


def test_the_layouts_of_the_real_model_pass(tiny_cfg):
    keye = load_model_config("keye-8b")  # 32 heads, 8 KV heads, 36 layers
    for layout in (dict(tp=8), dict(tp=16), dict(tp=32), dict(tp=2, pp=4, cp=2), dict(pp=4, schedule="interleaved",
                                                                                    virtual_stages=9)):
        ParallelConfig(**layout).check(keye, grad_accum=8, world_size=64)
    with pytest.raises(ConfigError, match=r"choose parallel.tp from 1, 2, 4, 8, 16 or 32$"):
        ParallelConfig(tp=12).check(keye, 1)


def test_the_tp_rule_agrees_with_tensor_parallel(tiny_cfg):
    for heads, kv in ((4, 2), (12, 4), (32, 8), (6, 3), (8, 8)):
        cfg = with_text(tiny_cfg, num_heads=heads, num_kv_heads=kv)
        for tp in range(1, 2 * heads + 1):
            try:
                kv_heads_replicated(cfg.text, tp)
                late = cfg.text.vocab_size % tp == 0
            except ValueError:
                late = False
            try:
                ParallelConfig(tp=tp).check(cfg, 1)
                early = True
            except ConfigError:
                early = False
            assert early == late, (heads, kv, tp)


def test_the_world_rule_agrees_with_the_topology(tiny_cfg):
    for pp, cp, tp, dp in ((1, 1, 2, 0), (2, 2, 1, 0), (1, 2, 2, 2), (2, 1, 2, 1)):
        for world in range(1, 17):
            try:
                ParallelDims(pp, dp, cp, tp).resolve(world)
                late = True
            except ValueError:
                late = False
            try:
                ParallelConfig(tp=tp, pp=pp, cp=cp, dp=dp).check_world(world)
                early = True
            except ConfigError:
                early = False
            assert early == late, (pp, cp, tp, dp, world)


def test_the_stage_rule_agrees_with_the_pipeline_split(tiny_cfg):
    for layers in (2, 3, 5):
        for stages in range(1, 8):
            try:
                split_layers(layers, stages)
                late = True
            except ValueError:
                late = False
            try:
                ParallelConfig(pp=stages).check(with_text(tiny_cfg, num_layers=layers), grad_accum=stages)
                early = True
            except ConfigError:
                early = False
            assert early == late, (layers, stages)
