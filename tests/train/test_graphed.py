"""The CUDA-graphed step (train/graphed.py) computes what train_step computes.

On CPU, `ReplayedCall` stands in for the CUDA graph with the semantics that matter: capturing runs
the Python (gradients get their tensors, the optimizer its state) but changes no values; a replay
reruns the captured work with the numbers it baked in (weight decay, a float LR) and, like the
recorded backward, assigns the gradients that had none at capture and adds to the others.
"""

import pytest
import torch

from bitnet.model import ModelConfig, Transformer
from bitnet.train.config import TrainConfig
from bitnet.train.graphed import GraphedTrainStep, use_cuda_graphs
from bitnet.train.optim import build_optimizer, portable_state_dict, set_schedule
from bitnet.train.step import train_step

TINY = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=16)


class ReplayedCall:
    def capture(self, fn, optimizer):
        self.fn, self.optimizer = fn, optimizer
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        # baked: every number the captured kernels read as a constant
        self.baked = [{k: v for k, v in g.items() if isinstance(v, float)} for g in optimizer.param_groups]
        values = [p.detach().clone() for p in self.params]
        state = {p: {k: v.clone() for k, v in optimizer.state[p].items()} for p in self.params}
        fn()  # the Python runs; the values it writes are undone (a capture executes nothing)
        self.assigned = [p.grad is not None for p in self.params]  # graph-owned gradients from now on
        for p, v in zip(self.params, values):
            p.data.copy_(v)
        for p in self.params:
            for k, v in state[p].items():
                optimizer.state[p][k].copy_(v)

    def replay(self):
        live = [dict(g) for g in self.optimizer.param_groups]
        for g, baked in zip(self.optimizer.param_groups, self.baked):
            g.update(baked)
        for p, assigned in zip(self.params, self.assigned):
            if assigned:
                p.grad = None  # the recorded backward writes these instead of adding to them
        self.fn()
        for g, d in zip(self.optimizer.param_groups, live):
            g.update({k: d[k] for k in self.baked[0]})


def make(seed=0):
    torch.manual_seed(seed)
    model = Transformer(TINY)
    model.init_weights(seed=seed)
    opt = build_optimizer(model, TrainConfig(), fused=False)
    return model, opt


def batches(step, n_micro=1, seq=16, batch=2):
    g = torch.Generator().manual_seed(1000 + step)
    out = []
    for _ in range(n_micro):
        t = torch.randint(0, TINY.vocab_size, (batch, seq + 1), generator=g)
        out.append((t[:, :-1], t[:, 1:]))
    return out


def run(stepper, opt, steps, wd_change_at=None, n_micro=1, seq_at=None):
    """(losses, grad norms) of `steps` steps with a moving LR and the weight decay cut at wd_change_at."""
    losses, norms = [], []
    for s in range(1, steps + 1):
        lr, wd = 1e-2 / s, (0.1 if wd_change_at is None or s < wd_change_at else 0.0)
        set_schedule(opt, lr, wd)
        seq = seq_at(s) if seq_at else 16
        out = stepper(batches(s, n_micro, seq), lr=lr, wd=wd)
        losses.append(out.loss)
        norms.append(out.grad_norm)
    return torch.stack(losses), torch.stack(norms)


def eager(model, opt):
    nullctx = torch.autocast("cpu", enabled=False)
    return lambda mb, lr, wd: train_step(model, opt, mb, lambda: nullctx, 1.0, lr, wd, torch.device("cpu"))


def graphed(model, opt, warmup=2):
    nullctx = torch.autocast("cpu", enabled=False)
    return GraphedTrainStep(model, opt, lambda: nullctx, 1.0, torch.device("cpu"), warmup_steps=warmup,
                            graph_factory=ReplayedCall)


@pytest.mark.parametrize("n_micro", [1, 3])
def test_replayed_steps_equal_train_step(n_micro):
    ref_model, ref_opt = make()
    model, opt = make()
    want = run(eager(ref_model, ref_opt), ref_opt, 7, wd_change_at=5, n_micro=n_micro)
    stepper = graphed(model, opt)
    got = run(stepper, opt, 7, wd_change_at=5, n_micro=n_micro)
    assert stepper.captures == 2  # step 3, and again when the weight decay changed at step 5
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for p, q in zip(ref_model.parameters(), model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    assert len(set(x.data_ptr() for x in got[0])) == 7  # step outputs are copies, not the graph's buffers


def test_a_new_batch_shape_is_captured_anew():
    ref_model, ref_opt = make()
    model, opt = make()
    seq_at = lambda s: 16 if s < 6 else 8  # noqa: E731
    want = run(eager(ref_model, ref_opt), ref_opt, 7, seq_at=seq_at)
    stepper = graphed(model, opt)
    got = run(stepper, opt, 7, seq_at=seq_at)
    assert stepper.captures == 2
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)


def test_a_stale_replay_is_what_the_stand_in_catches():
    """The stand-in bakes the weight decay: a step that never recaptured would drift from train_step."""
    ref_model, ref_opt = make()
    model, opt = make()
    run(eager(ref_model, ref_opt), ref_opt, 6, wd_change_at=4)
    stepper = graphed(model, opt)
    stepper._capture = lambda mb, key, _orig=stepper._capture: _orig(mb, key) if stepper.graph is None else None
    run(stepper, opt, 6, wd_change_at=4)
    diff = max((p - q).abs().max().item() for p, q in zip(ref_model.parameters(), model.parameters()))
    assert diff > 1e-6


def test_lr_lives_in_a_tensor_once_captured_and_checkpoints_stay_portable():
    model, opt = make()
    stepper = graphed(model, opt, warmup=0)
    set_schedule(opt, 1e-3, 0.1)
    stepper(batches(1), lr=1e-3, wd=0.1)
    assert all(isinstance(g["lr"], torch.Tensor) for g in opt.param_groups)
    set_schedule(opt, 2e-3, 0.1)
    assert all(g["lr"].item() == pytest.approx(2e-3) for g in opt.param_groups)
    sd = portable_state_dict(opt)
    assert all(type(g["lr"]) is float and g["capturable"] is False for g in sd["param_groups"])
    steps_before = {float(st["step"]) for st in sd["state"].values()}
    fresh_model, fresh_opt = make()
    fresh_model.load_state_dict(model.state_dict())
    fresh_opt.load_state_dict(sd)  # a plain (uncaptured) optimizer steps with it
    before = [p.detach().clone() for p in fresh_model.parameters()]
    out = train_step(fresh_model, fresh_opt, batches(2), lambda: torch.autocast("cpu", enabled=False), 1.0, 2e-3, 0.1,
                     torch.device("cpu"))
    assert torch.isfinite(out.loss) and len(steps_before) == 1
    assert {fresh_opt.state[p]["step"].item() for p in fresh_model.parameters()} == {steps_before.pop() + 1}
    assert all(type(g["lr"]) is float and g["lr"] == pytest.approx(2e-3) for g in fresh_opt.param_groups)
    # an Adam step moves each weight by about lr (|m_hat / sqrt(v_hat)| <= ~1 early on), plus lr * wd * w
    moved = max((p - b).abs().max().item() for p, b in zip(fresh_model.parameters(), before))
    assert 0.5 * 2e-3 < moved < 5 * 2e-3


def test_use_cuda_graphs_decides_and_explains():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert use_cuda_graphs("auto", cuda, 1, "warn")
    assert use_cuda_graphs("on", cuda, 1, "stop")
    assert not use_cuda_graphs("off", cuda, 1, "warn")
    assert not use_cuda_graphs("auto", cpu, 1, "warn")
    assert not use_cuda_graphs("auto", cuda, 2, "warn")
    assert not use_cuda_graphs("auto", cuda, 1, "skip")
    with pytest.raises(ValueError, match="device is cpu"):
        use_cuda_graphs("on", cpu, 1, "warn")
    with pytest.raises(ValueError, match="anomaly-policy skip"):
        use_cuda_graphs("on", cuda, 1, "skip")


@pytest.mark.gpu
def test_cuda_graph_steps_equal_train_step_on_gpu():
    from bitnet.train.step import compile_step

    dev = torch.device("cuda")
    autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    results = []
    for use_graph in (False, True):
        torch.manual_seed(0)
        model = Transformer(TINY).to(dev)
        model.init_weights(seed=0)
        opt = build_optimizer(model, TrainConfig(), fused=True)
        step_model = compile_step(model)
        if use_graph:
            stepper = GraphedTrainStep(step_model, opt, autocast, 1.0, dev)
        else:
            stepper = lambda mb, lr, wd: train_step(step_model, opt, mb, autocast, 1.0, lr, wd, dev)  # noqa: E731
        out = run(stepper, opt, 7, wd_change_at=5, n_micro=2)
        results.append((out, [p.detach().clone() for p in model.parameters()]))
        if use_graph:
            assert stepper.captures == 2
    (want, want_p), (got, got_p) = results
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    for p, q in zip(want_p, got_p):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)
