"""KernelChoice: the one switch between each kernel and its reference."""

import pytest
import torch
import torch.nn.functional as F

from bitnet.model import PRESETS, Transformer
from bitnet.model.kernels import (CrossEntropyLaunch, KernelChoice, SwigluLaunch, choice, cross_entropy,
                                  current_kernels, rmsnorm, rope, set_kernels, swiglu, use_kernels)
from bitnet.model.kernels.references import (head_cross_entropy_reference, norm_act_quant_reference,
                                             rope_qkv_reference, swiglu_norm_act_quant_reference)
from tests.model.kernels.helpers import EPS, cuda, head_inputs, inputs, qkv_inputs, swiglu_inputs

ALL_TORCH = KernelChoice(norm_quant="torch", swiglu_norm_quant="torch", rope_qkv="torch", loss="torch",
                         embedding="torch")


def test_defaults_are_the_kernels_with_their_shipped_launch_settings():
    c = KernelChoice()
    assert (c.norm_quant, c.swiglu_norm_quant, c.rope_qkv, c.loss, c.embedding) == ("auto",) * 5
    assert c.swiglu_launch == SwigluLaunch() and c.cross_entropy_launch == CrossEntropyLaunch(block=4096, warps=16)
    assert current_kernels() == c


def test_bad_values_are_refused_with_the_field_name():
    with pytest.raises(ValueError, match=r"KernelChoice.loss must be one of \('auto', 'torch'\), got 'triton'"):
        KernelChoice(loss="triton")
    with pytest.raises(ValueError, match=r"KernelChoice.norm_quant must be one of \('auto', 'torch', 'kernel'\), "
                                         r"got 'triton'"):
        KernelChoice(norm_quant="triton")
    assert KernelChoice(norm_quant="kernel").norm_quant == "kernel"  # the kernel inside compiled regions too
    with pytest.raises(TypeError, match="KernelChoice.swiglu_launch must be a SwigluLaunch"):
        KernelChoice(swiglu_launch={"fwd_rows": 2})
    with pytest.raises(TypeError, match="set_kernels takes a KernelChoice"):
        set_kernels("torch")
    with pytest.raises(AttributeError):  # frozen: a choice is replaced, never edited in place
        KernelChoice().loss = "torch"


def test_from_dict_builds_the_launch_settings_from_their_fields():
    c = KernelChoice.from_dict({"loss": "torch", "swiglu_launch": {"bwd_rows": 2, "bwd_prefetch": False},
                                "cross_entropy_launch": {"warps": 8}})
    assert c.loss == "torch" and c.embedding == "auto"
    assert c.swiglu_launch == SwigluLaunch(bwd_rows=2, bwd_prefetch=False)
    assert c.cross_entropy_launch == CrossEntropyLaunch(block=4096, warps=8)
    assert KernelChoice.from_dict({}) == KernelChoice()
    with pytest.raises(TypeError):
        KernelChoice.from_dict({"swiglu_launch": {"no_such_field": 1}})


def test_use_kernels_restores_the_previous_choice_however_the_block_ends():
    before = current_kernels()
    with use_kernels(ALL_TORCH) as c:
        assert c is ALL_TORCH and current_kernels() is ALL_TORCH
        with use_kernels(KernelChoice(loss="torch")):
            assert current_kernels().loss == "torch" and current_kernels().embedding == "auto"
        assert current_kernels() is ALL_TORCH
    assert current_kernels() is before
    with pytest.raises(RuntimeError, match="boom"):
        with use_kernels(ALL_TORCH):
            raise RuntimeError("boom")
    assert current_kernels() is before
    previous = set_kernels(ALL_TORCH)
    try:
        assert previous is before and current_kernels() is ALL_TORCH
    finally:
        assert set_kernels(previous) is ALL_TORCH
    assert current_kernels() is before


def test_cpu_tensors_take_every_reference_whatever_the_choice():
    x, w = inputs((3, 64), torch.float32)
    gate_up, w2 = swiglu_inputs((3, 64), torch.float32)
    qkv, cos, sin = qkv_inputs(2, 4, 4, 2, 8, torch.float32, seed=1)
    hx, hw, t = head_inputs(6, 8, 50, seed=2)
    for c in (KernelChoice(), ALL_TORCH, KernelChoice(norm_quant="kernel")):
        with use_kernels(c):
            assert torch.equal(choice.norm_act_quant(x, w, EPS, torch.bfloat16),
                               norm_act_quant_reference(x, w, EPS, torch.bfloat16))
            assert torch.equal(choice.swiglu_norm_act_quant(gate_up, w2, EPS, torch.float32),
                               swiglu_norm_act_quant_reference(gate_up, w2, EPS, torch.float32))
            assert choice.stacks_qkv(qkv) is False
            for a, b in zip(choice.rope_qkv(qkv, cos, sin, 4, 2), rope_qkv_reference(qkv, cos, sin, 4, 2)):
                assert torch.equal(a, b)
            assert torch.equal(choice.head_cross_entropy(hx, hw, t, torch.float32),
                               head_cross_entropy_reference(hx, hw, t, torch.float32))
            idx = torch.tensor([[1, 2, 2]])
            assert torch.equal(choice.embedding(idx, hw), F.embedding(idx, hw))


def test_the_model_trains_identically_on_cpu_under_either_choice():
    """On the CPU the choice changes nothing: losses and gradients are bitwise those of the references."""
    idx = torch.randint(0, 32000, (2, 16), generator=torch.Generator().manual_seed(0))
    results = []
    for c in (KernelChoice(), ALL_TORCH):
        model = Transformer(PRESETS["tiny"])
        model.init_weights(seed=0)
        with use_kernels(c):
            loss = model(idx, targets=idx.roll(-1, dims=1))
        loss.backward()
        results.append([loss.detach()] + [p.grad for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_dispatchers_compile_into_one_graph_under_either_choice():
    """torch.compile traces the dispatchers and the choice they read without a graph break (fullgraph)."""
    x, w = inputs((3, 64), torch.float32)
    gate_up, w2 = swiglu_inputs((3, 64), torch.float32)
    f = torch.compile(lambda a, b, c, d: choice.norm_act_quant(a, b, EPS, torch.float32)
                      + choice.swiglu_norm_act_quant(c, d, EPS, torch.float32), fullgraph=True)
    want = norm_act_quant_reference(x, w, EPS, torch.float32) + swiglu_norm_act_quant_reference(gate_up, w2, EPS,
                                                                                              torch.float32)
    for c in (KernelChoice(), ALL_TORCH, KernelChoice(norm_quant="kernel")):
        with use_kernels(c):
            torch.testing.assert_close(f(x, w, gate_up, w2), want)


@pytest.mark.gpu
@cuda
def test_on_cuda_auto_runs_each_kernel_and_torch_each_reference():
    """Under the default choice the dispatchers return the kernels' results, bit for bit; under "torch" the
    references'; the launch settings of the choice reach the kernels."""
    dev = "cuda"
    x, w = (t.to(dev) for t in inputs((4, 33, 768), torch.bfloat16))
    gate_up, w2 = (t.to(dev) for t in swiglu_inputs((4, 33, 768), torch.bfloat16))
    qkv, cos, sin = (t.to(dev) for t in qkv_inputs(2, 8, 4, 2, 16, torch.bfloat16, seed=1))
    hx, hw, t = (a.to(dev) for a in head_inputs(64, 32, 1000, seed=2))
    launch = SwigluLaunch(fwd_rows=2, bwd_prefetch=False)
    with torch.enable_grad():
        with use_kernels(KernelChoice(swiglu_launch=launch)):
            assert torch.equal(choice.norm_act_quant(x, w, EPS, torch.bfloat16),
                               rmsnorm.rmsnorm_act_quant(x, w, EPS, torch.bfloat16))
            assert torch.equal(choice.swiglu_norm_act_quant(gate_up, w2, EPS, torch.bfloat16),
                               swiglu.swiglu_norm_act_quant(gate_up, w2, EPS, torch.bfloat16, launch))
            assert choice.stacks_qkv(qkv)
            for a, b in zip(choice.rope_qkv(qkv, cos, sin, 4, 2), rope.rope_qkv(qkv, cos, sin, 4, 2)):
                assert torch.equal(a, b)
            assert torch.equal(choice.head_cross_entropy(hx, hw, t, torch.bfloat16),
                               cross_entropy.linear_cross_entropy(hx, hw, t, torch.bfloat16))
        with use_kernels(ALL_TORCH):
            assert torch.equal(choice.norm_act_quant(x, w, EPS, torch.bfloat16),
                               norm_act_quant_reference(x, w, EPS, torch.bfloat16))
            assert torch.equal(choice.swiglu_norm_act_quant(gate_up, w2, EPS, torch.bfloat16),
                               swiglu_norm_act_quant_reference(gate_up, w2, EPS, torch.bfloat16))
            assert not choice.stacks_qkv(qkv)
            assert torch.equal(choice.head_cross_entropy(hx, hw, t, torch.bfloat16),
                               head_cross_entropy_reference(hx, hw, t, torch.bfloat16))
        # inside torch.compile: the reference (for inductor to fuse) under "auto", the kernel's op under "kernel"
        traced = []

        def backend(gm, example_inputs):
            traced.append(any("rmsnorm_act_quant" in str(n.target) for n in gm.graph.nodes))
            return gm.forward

        for c, want in ((KernelChoice(), norm_act_quant_reference), (KernelChoice(norm_quant="kernel"),
                                                                     rmsnorm.rmsnorm_act_quant)):
            torch._dynamo.reset()
            with use_kernels(c):
                y = torch.compile(lambda a, b: choice.norm_act_quant(a, b, EPS, torch.bfloat16), backend=backend)(x, w)
            assert torch.equal(y, want(x, w, EPS, torch.bfloat16))  # the traced graph runs eagerly: bit for bit
        assert traced == [False, True]
