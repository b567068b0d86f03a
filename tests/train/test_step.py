"""train_step's gradient clipping: handed to a fused AdamW as its grad_scale, or applied to the grads."""

import pytest
import torch

from bitnet.train.step import clip_gradients


def params_with_grads(scale: float, seed: int = 0, device: str = "cpu") -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(shape, generator=g).to(device)) for shape in ((7, 5), (5,), (3, 4, 2))]
    for p in ps:
        p.grad = (torch.randn(p.shape, generator=g) * scale).to(device)
    return ps


class Holder(torch.nn.Module):
    def __init__(self, ps):
        super().__init__()
        self.ps = torch.nn.ParameterList(ps)


def run_fused_clip_vs_clip_grad_norm(scale: float, device: str) -> None:
    want_ps = params_with_grads(scale, device=device)
    want_norm = torch.nn.utils.clip_grad_norm_(want_ps, 1.0)
    ref = torch.optim.AdamW(want_ps, lr=1e-2, weight_decay=0.1, foreach=False)
    ref.step()

    ps = params_with_grads(scale, device=device)
    grads_before = [p.grad.clone() for p in ps]
    opt = torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True)
    per_param, norm = clip_gradients(Holder(ps), 1.0, opt)
    assert all(torch.equal(p.grad, g) for p, g in zip(ps, grads_before))  # the optimizer clips, not this
    torch.testing.assert_close(norm, want_norm)
    torch.testing.assert_close(per_param, torch.stack([g.norm() for g in grads_before]))
    assert (opt.grad_scale > 1) == (scale > 1)  # a divisor: > 1 only when clipping
    opt.step()
    for p, q in zip(ps, want_ps):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("scale", [0.01, 10.0])  # global grad norm under and over the clip of 1.0
def test_fused_adamw_clip_equals_clip_grad_norm(scale):
    run_fused_clip_vs_clip_grad_norm(scale, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scale", [0.01, 10.0])
def test_fused_adamw_clip_equals_clip_grad_norm_on_gpu(scale):
    run_fused_clip_vs_clip_grad_norm(scale, "cuda")


def test_clip_scales_the_grads_for_other_optimizers_and_zero_turns_it_off():
    ps = params_with_grads(10.0)
    want = [p.grad.clone() for p in ps]
    _, norm = clip_gradients(Holder(ps), 1.0, torch.optim.AdamW(ps, foreach=True))
    for p, g in zip(ps, want):
        torch.testing.assert_close(p.grad, g * (1.0 / (norm + 1e-6)))
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ps]))
    assert abs(total.item() - 1.0) < 1e-5

    ps = params_with_grads(10.0)
    opt = torch.optim.AdamW(ps, fused=True)
    opt.grad_scale = torch.tensor(5.0)  # a stale clip from an earlier step must not survive
    clip_gradients(Holder(ps), 0.0, opt)
    assert opt.grad_scale is None


def test_start_compile_workers_warms_inductors_pool(monkeypatch):
    from torch._inductor import async_compile

    from bitnet.train import step
    calls = []
    monkeypatch.setattr(async_compile, "maybe_warm_pool", lambda: calls.append("warm"))
    step.start_compile_workers()
    assert calls == ["warm"]


def test_the_trainer_starts_the_compile_workers_before_its_setup_where_it_compiles_on_cuda(monkeypatch, tmp_path):
    import dataclasses

    from bitnet.cli.train import train_main
    from bitnet.train import loop
    from tests.conftest import fast_args

    class Started(Exception):
        pass

    def on_cuda(*args):  # the CPU run's settings, as a compiled run on CUDA would have them
        return dataclasses.replace(settings(*args), device=torch.device("cuda"), use_compile=True)

    def start():
        raise Started  # stop the run here: the data and the model are not built yet

    built = []
    settings = loop.settings
    monkeypatch.setattr(loop, "settings", on_cuda)
    monkeypatch.setattr(loop, "start_compile_workers", start)
    monkeypatch.setattr(loop, "build_data", lambda *a, **k: built.append("data"))
    with pytest.raises(Started):
        train_main(fast_args(tmp_path, "cuda", steps=2))
    assert built == []


def test_the_trainer_on_the_cpu_starts_no_compile_workers(monkeypatch, tmp_path):
    from bitnet.cli.train import train_main
    from bitnet.train import loop
    from tests.conftest import fast_args
    calls = []
    monkeypatch.setattr(loop, "start_compile_workers", lambda: calls.append("warm"))
    assert train_main(fast_args(tmp_path, "cpu", steps=2)) == 0  # inductor's pool is for its GPU kernels
    assert calls == []
