"""KernelChoice.attention: SDPA or FlashAttention-4, and the fallback to SDPA where FA4 cannot run."""

import math

import pytest
import torch

from bitnet.model import PRESETS, Transformer
from bitnet.model.kernels import KernelChoice, attention, choice, use_kernels


def _qkv(B=2, T=12, H=4, Hkv=2, D=8, seed=0, device="cpu", grad=False, dtype=torch.float32):
    """q (B, H, T, D), k and v (B, Hkv, T, D) as views of (B, T, heads, D) storage, like the rope kernel's."""
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(B, T, h, D, generator=g).to(device, dtype) for h in (H, Hkv, Hkv)]
    if grad:
        ts = [t.requires_grad_() for t in ts]
    return ts, [t.transpose(1, 2) for t in ts]


def _naive(q, k, v):
    """Causal softmax attention written out, kv heads repeated for their query groups: (B, T, H*D)."""
    B, H, T, D = q.shape
    rep = H // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * D)


def test_attention_choice_defaults_to_sdpa_and_refuses_unknown_names():
    assert KernelChoice().attention == "sdpa"
    assert KernelChoice(attention="fa4").attention == "fa4"
    assert KernelChoice.from_dict({"attention": "fa4"}) == KernelChoice(attention="fa4")
    with pytest.raises(ValueError, match=r"KernelChoice.attention must be one of \('sdpa', 'fa4'\), got 'fa3'"):
        KernelChoice(attention="fa3")
    with pytest.raises(ValueError, match=r"KernelChoice.loss must be one of \('auto', 'torch'\), got 'fa4'"):
        KernelChoice(loss="fa4")  # the other ops keep their own names


def test_causal_attention_is_causal_gqa_softmax_attention_in_the_model_layout():
    _, (q, k, v) = _qkv(seed=3)
    want = _naive(q, k, v)
    for impl in ("sdpa", "fa4"):
        with use_kernels(KernelChoice(attention=impl)):
            got = choice.causal_attention(q, k, v)
        assert got.shape == (2, 12, 4 * 8)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the first query sees only the first key: its output is v's first row, for each head's kv group
    assert torch.allclose(want[:, 0].view(2, 4, 8), v[:, :, 0].repeat_interleave(2, dim=1), atol=1e-6)


def test_fa4_is_not_used_on_cpu_and_says_why():
    _, (q, k, _) = _qkv()
    assert attention.fa4_applies(q, k) is False  # CPU tensors: decided before any probe or import
    if not torch.cuda.is_available():
        assert attention.fa4_available() is False
        assert "compute capability 9.x or 10.x, found none" in attention.fa4_import_error()
    assert attention.fa4_applies(q.bfloat16(), k.bfloat16()) is False


def test_fa4_choice_trains_the_model_exactly_like_sdpa_off_cuda():
    torch.manual_seed(0)
    model = Transformer(PRESETS["tiny"])
    idx = torch.randint(0, PRESETS["tiny"].vocab_size, (2, 16))
    results = []
    for impl in ("sdpa", "fa4"):
        model.zero_grad(set_to_none=True)
        with use_kernels(KernelChoice(attention=impl)):
            loss = model(idx[:, :-1], targets=idx[:, 1:])
            loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))


def test_fa4_ops_trace_with_the_shapes_and_layouts_of_their_outputs():
    """The custom ops' fake implementations (what torch.compile traces) on meta tensors, through autograd:
    out is (B, T, H, D) contiguous, lse (B, H, T) fp32, and the GQA gradients have k's and v's shapes."""
    (qs, ks, vs), (q, k, v) = _qkv(B=2, T=16, H=6, Hkv=2, D=64, device="meta", grad=True)
    out, lse = attention.fa4_causal_fwd(qs.bfloat16(), ks.bfloat16(), vs.bfloat16())
    assert out.shape == (2, 16, 6, 64) and out.is_contiguous() and out.dtype == torch.bfloat16
    assert lse.shape == (2, 6, 16) and lse.dtype == torch.float32
    y = attention.fa4_causal(q, k, v)
    assert y.shape == (2, 16, 6 * 64)
    y.sum().backward()
    assert qs.grad.shape == qs.shape and ks.grad.shape == ks.shape and vs.grad.shape == vs.shape


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fa4_matches_sdpa_forward_and_backward_on_the_gpu():
    """FA4 against SDPA at a 95m layer's head shapes (bf16); skipped where FA4 is not installed."""
    if not attention.fa4_available():
        pytest.skip(f"FA4 not usable here: {attention.fa4_import_error()}")
    (qs, ks, vs), (q, k, v) = _qkv(B=4, T=256, H=12, Hkv=6, D=64, device="cuda", grad=True, dtype=torch.bfloat16)
    dy = torch.randn(4, 256, 12 * 64, device="cuda", dtype=torch.bfloat16)
    outs = []
    for fn in (attention.sdpa_causal, attention.fa4_causal):
        for t in (qs, ks, vs):
            t.grad = None
        y = fn(q, k, v)
        y.backward(dy)
        outs.append([y.detach().float()] + [t.grad.float() for t in (qs, ks, vs)])
    for name, a, b in zip(("out", "dq", "dk", "dv"), *outs):
        assert (a - b).abs().max().item() < 2e-2 * max(1.0, a.abs().max().item()), name
