"""Fused RMSNorm and fused AdamW equal their pure-PyTorch references (keyetron.backend.kernels).

torch's own kernels run here (CPU); apex's need CUDA and a source build and are skipped
elsewhere. The swap keeps the model's parameters and names, and works under tensor
parallelism (DTensor norms), which is where the lead installs it.
"""
from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from torch import nn

from distributed import run_ranks
from keyetron.backend import kernels
from keyetron.batch import IGNORE_INDEX, PackedBatch
from keyetron.model import build_model
from keyetron.model.llm import RMSNorm
from synthetic import lm_loss, make_document

has_cuda = torch.cuda.is_available()
apex_norm = pytest.mark.skipif(not (has_cuda and kernels.rms_norm_available("apex", "cuda" if has_cuda else "cpu")),
                               reason="needs CUDA and NVIDIA apex built with its CUDA extensions")

# (input dtype, weight dtype) -> (rtol, atol) of a kernel against the reference. A fused kernel
# multiplies by the weight before rounding to the input dtype, the reference after: one rounding
# step of the input dtype apart (bf16: 2^-8 relative).
TOLERANCES = {
    (torch.float64, torch.float64): (1e-12, 1e-12),
    (torch.float32, torch.float32): (1e-5, 1e-6),
    (torch.bfloat16, torch.float32): (1e-2, 1e-2),
    (torch.bfloat16, torch.bfloat16): (2e-2, 2e-2),
}


def _inputs(x_dtype, w_dtype, device="cpu"):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(37, 48, generator=gen, dtype=torch.float64) * 3).to(device, x_dtype)
    w = (1 + 0.1 * torch.randn(48, generator=gen, dtype=torch.float64)).to(device, w_dtype)
    grad = torch.randn(37, 48, generator=gen, dtype=torch.float64).to(device)
    return x, w, grad


def _forward_backward(fn, x, w, grad):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = fn(x, w, 1e-6)
    out.backward(grad.to(out.dtype))
    return out.detach(), x.grad, w.grad


@pytest.mark.parametrize("dtypes", list(TOLERANCES))
def test_reference_rms_norm_is_the_models_rmsnorm(dtypes):
    x, w, _ = _inputs(*dtypes)
    norm = RMSNorm(48, 1e-6).to(dtypes[1])
    norm.weight.data.copy_(w)
    expected = norm(x)
    out = kernels.reference_rms_norm(x, w, 1e-6)
    assert out.dtype == expected.dtype
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def _compare(impl, dtypes, device):
    x, w, grad = _inputs(*dtypes, device=device)
    ref = _forward_backward(kernels.reference_rms_norm, x, w, grad)
    got = _forward_backward(kernels._IMPLS[impl], x, w, grad)
    rtol, atol = TOLERANCES[dtypes]
    for name, a, b in zip(("output", "input grad", "weight grad"), got, ref):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol * max(1.0, float(b.abs().max())), msg=name)


@pytest.mark.parametrize("dtypes", list(TOLERANCES))
def test_torch_fused_rms_norm_equals_reference(dtypes):
    _compare("torch", dtypes, "cpu")


@apex_norm
@pytest.mark.parametrize("dtypes", [d for d in TOLERANCES if d[0] != torch.float64])
def test_apex_fused_rms_norm_equals_reference(dtypes):
    _compare("apex", dtypes, "cuda")


def test_cpu_keeps_the_reference_and_refuses_apex(tiny_cfg):
    assert kernels.fused_rms_norm_available("cpu") is None
    assert kernels.select_rms_norm("auto", "cpu") == "reference"
    with pytest.raises(RuntimeError, match="'apex' cannot run on cpu"):
        kernels.select_rms_norm("apex", "cpu")
    with pytest.raises(ValueError, match="unknown RMSNorm implementation 'triton'"):
        kernels.select_rms_norm("triton", "cpu")
    model = build_model(tiny_cfg, dtype=torch.float64, seed=0)
    assert kernels.swap_rms_norm(model, RMSNorm) == 0
    assert not any(isinstance(m, kernels.FusedRMSNorm) for m in model.modules())


def _row(cfg):
    gen = torch.Generator().manual_seed(3)
    return PackedBatch.from_documents([make_document(cfg, gen, text=6, images=[(4, 4)]),
                                       make_document(cfg, gen, text=5)])


def test_swapped_norms_keep_parameters_names_and_results(tiny_cfg):
    reference = build_model(tiny_cfg, dtype=torch.float64, seed=0)
    model = copy.deepcopy(reference)
    keys, params = list(model.state_dict()), dict(model.named_parameters())
    # Per decoder layer: input, post-attention, q and k norms; plus the final norm.
    assert kernels.swap_rms_norm(model, RMSNorm, "torch") == 4 * tiny_cfg.text.num_layers + 1
    assert not any(type(m) is RMSNorm for m in model.modules())
    assert list(model.state_dict()) == keys and all(p is params[n] for n, p in model.named_parameters())
    row = _row(tiny_cfg)
    for m in (reference, model):
        lm_loss(m, row).loss_sum.backward()
    for (name, p), q in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=name)


def _llm_loss(llm, row):
    hidden = llm(llm.embed_tokens(row.input_ids), row)
    keep = row.targets != IGNORE_INDEX
    return -llm.lm_head.token_logprobs(hidden[keep], row.targets[keep]).sum()


def _tp_rank(rank, world, cfg, row, reference):
    from keyetron.parallel.tensor_parallel import apply_tensor_parallel, reduce_tp_partial_grads
    from keyetron.parallel.topology import ParallelDims, Topology

    topo = Topology.from_process_group(ParallelDims(tp=world), "cpu")
    worst = {}
    for sp in (True, False):
        llm = build_model(cfg, dtype=torch.float64, seed=0).llm
        kernels.swap_rms_norm(llm, RMSNorm, "torch")  # before TP, as parallelize_keye would
        apply_tensor_parallel(llm, topo.submesh("tp"), sequence_parallel=sp)
        assert isinstance(llm.layers[0].self_attn.q_norm, kernels.FusedRMSNorm)
        loss = _llm_loss(llm, row)
        loss.backward()
        reduce_tp_partial_grads(llm)
        errors = [abs(float(loss.detach()) - reference[0])]
        for name, p in llm.named_parameters():
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            errors.append(float((g - reference[1][name]).abs().max()))
        worst[sp] = max(errors)
    return worst


def test_fused_rms_norm_under_tensor_parallelism_equals_one_process(tiny_cfg):
    """Norms on sequence shards, on head shards (q/k norms) and replicated: the weight's
    gradient is summed over the ranks exactly when the rows were split."""
    row = _row(tiny_cfg)
    assert row.num_tokens % 2 == 0  # sequence parallelism over 2 ranks
    llm = build_model(tiny_cfg, dtype=torch.float64, seed=0).llm
    loss = _llm_loss(llm, row)
    loss.backward()
    reference = (float(loss.detach()), {n: p.grad.clone() for n, p in llm.named_parameters()})
    for worst in run_ranks(2, _tp_rank, tiny_cfg, row, reference):
        assert max(worst.values()) < 1e-9, worst


# -- AdamW ---------------------------------------------------------------------------------------------

def _groups(params):
    return [{"params": params[:2], "lr": 1e-2, "weight_decay": 0.1},
            {"params": params[2:], "lr": 3e-3, "weight_decay": 0.0}]


def _adamw_steps(make, params, steps=4):
    gen = torch.Generator().manual_seed(1)
    opt = make(_groups(params))
    for _ in range(steps):
        for p in params:
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.grad = _like(p, g)
        opt.step()
    return opt


def _like(p, full):
    """``full`` laid out like parameter ``p`` (its local shard when p is a DTensor)."""
    if hasattr(p, "placements"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(p.dtype), p.device_mesh, p.placements)
    return full.to(p.device, p.dtype)


def _reference_adamw(groups):
    return torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-8, foreach=False)  # the per-tensor loop


def _params(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    shapes = ((8, 6), (6,), (4, 6), (5,))
    return [nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)) for s in shapes]


def test_fused_adamw_equals_the_reference_adamw():
    ref, fused = _params(), _params()
    _adamw_steps(_reference_adamw, ref)
    opt = _adamw_steps(lambda g: kernels.adamw(g, betas=(0.9, 0.95), eps=1e-8), fused)
    assert opt.defaults["fused"] is True
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_adamw_falls_back_to_foreach_for_integer_or_meta_parameters():
    assert kernels.fused_adamw_supported(_params())
    assert not kernels.fused_adamw_supported([torch.zeros(3, device="meta")])
    assert not kernels.fused_adamw_supported([])


def _dtensor_rank(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    placements = [[Shard(0)], [Replicate()], [Shard(1)], [Replicate()]]
    ref, dist_params = _params(), [nn.Parameter(distribute_tensor(p.detach().clone(), mesh, pl))
                                   for p, pl in zip(_params(), placements)]
    assert kernels.fused_adamw_supported(dist_params)
    _adamw_steps(_reference_adamw, ref)
    opt = _adamw_steps(lambda g: kernels.adamw(g, betas=(0.9, 0.95), eps=1e-8), dist_params)
    assert opt.defaults["fused"] is True
    return max(float((d.full_tensor() - r).abs().max()) for d, r in zip(dist_params, ref))


def test_fused_adamw_on_dtensor_shards_equals_the_reference():
    """TP/FSDP2 parameters are DTensors: torch's fused AdamW steps their shards in one kernel."""
    for error in run_ranks(2, _dtensor_rank):
        assert error < 1e-6


@pytest.mark.skipif(not has_cuda or importlib.util.find_spec("apex") is None, reason="needs CUDA and NVIDIA apex")
def test_apex_fused_adam_equals_the_reference_adamw():
    """apex's FusedAdam (AdamW mode) computes what torch's AdamW does: it adds nothing we use."""
    try:
        from apex.optimizers import FusedAdam
    except ImportError as e:  # apex without its CUDA extensions
        pytest.skip(f"apex.optimizers.FusedAdam unavailable: {e}")
    ref = [p.cuda() for p in _params()]
    apex_params = [nn.Parameter(p.detach().clone()) for p in ref]
    ref = [nn.Parameter(p.detach().clone()) for p in ref]
    _adamw_steps(_reference_adamw, ref)
    _adamw_steps(lambda g: FusedAdam(g, betas=(0.9, 0.95), eps=1e-8, adam_w_mode=True), apex_params)
    for a, b in zip(apex_params, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
