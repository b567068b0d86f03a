"""The head + cross entropy: the model's loss == F.cross_entropy of its logits (CPU), kernel == reference."""

import pytest
import torch
import torch.nn.functional as F

from bitnet.model.kernels import CrossEntropyLaunch, cross_entropy
from bitnet.model.kernels.references import IGNORE_INDEX, head_cross_entropy_reference
from bitnet.model.llama import head_cross_entropy
from tests.model.kernels.helpers import cuda, head_inputs, interpreter, rel, small_model_batch


def test_head_cross_entropy_fallback_is_the_reference():
    x, w, t = head_inputs(10, 16, 300, seed=0)
    xa, wa, xb, wb = (a.clone().requires_grad_() for a in (x, w, x, w))
    la = head_cross_entropy(xa.view(2, 5, 16), wa, t.view(2, 5))
    lb = F.cross_entropy(xb @ wb.t(), t, ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=1e-6)
    (la * 3).backward()  # the incoming gradient scales both results
    (lb * 3).backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(wa.grad, wb.grad)


def test_model_loss_equals_cross_entropy_of_its_logits():
    model, idx, y = small_model_batch(vocab=97, n_layers=1, n_heads=2, n_kv_heads=1, data_seed=1)
    logits = model(idx)
    torch.testing.assert_close(model(idx, targets=y), F.cross_entropy(logits.reshape(-1, 97), y.reshape(-1)))


def run_cross_entropy_vs_reference(device: str, cases, dtypes,
                                   launch: CrossEntropyLaunch = CrossEntropyLaunch()) -> None:
    for m, d, v in cases:
        x, w, t = head_inputs(m, d, v, seed=m + v)
        x, w, t = x.to(device), w.to(device), t.to(device)
        for dt in dtypes:
            # the kernel alone: loss rows (poisoned first) and the gradient written over the logits
            logits = F.linear(x.to(dt), w.to(dt))
            ref = logits.float().requires_grad_()
            ref_rows = F.cross_entropy(ref, t, reduction="none", ignore_index=IGNORE_INDEX)
            (ref_rows.sum() / (t != IGNORE_INDEX).sum()).backward()
            rows = torch.full((m,), float("nan"), device=device)
            count = (t != IGNORE_INDEX).sum().float()
            cross_entropy.launch_cross_entropy(logits, t, count, rows, launch)
            assert not rows.isnan().any() and not logits.isnan().any()
            assert rel(rows, ref_rows) < 1e-5, (m, v, dt)
            assert rel(logits, ref.grad) < (1e-2 if dt == torch.bfloat16 else 1e-5), (m, v, dt)
            # through autograd, with an incoming gradient other than 1, against the unfused head + loss
            xa, wa, xb, wb = (a.clone().requires_grad_() for a in (x, w, x, w))
            loss = cross_entropy.linear_cross_entropy(xa, wa, t, dt, launch)
            ref_loss = head_cross_entropy_reference(xb, wb, t, dt)
            torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
            (loss / 3).backward()
            (ref_loss / 3).backward()
            tol = 2e-2 if dt == torch.bfloat16 else 1e-5
            assert xa.grad.dtype == x.dtype and wa.grad.dtype == w.dtype
            assert rel(xa.grad, xb.grad) < tol and rel(wa.grad, wb.grad) < tol, (m, v, dt)


@interpreter
@pytest.mark.parametrize("launch", [CrossEntropyLaunch(block=256), CrossEntropyLaunch(),
                                    CrossEntropyLaunch(block=256, chunk_rows=2)])
def test_cross_entropy_kernels_on_the_interpreter(launch):
    # block 256: several strips per row at these sizes; the shipped block: one strip; fp32 and bf16 logits
    run_cross_entropy_vs_reference("cpu", [(5, 8, 1000), (3, 16, 700), (4, 8, 100)], [torch.float32, torch.bfloat16],
                                   launch)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("launch", [CrossEntropyLaunch(), CrossEntropyLaunch(chunk_rows=256)])
def test_cross_entropy_kernels_on_gpu(launch):
    run_cross_entropy_vs_reference("cuda", [(1, 768, 32000), (1000, 768, 32000), (333, 64, 1000), (64, 32, 100)],
                                   [torch.bfloat16, torch.float32], launch)


def chunked_against_whole(device: str, m: int, d: int, v: int, chunk_rows: int, dt: torch.dtype, monkeypatch) -> None:
    """The head in chunks of rows gives the loss of the whole head, and its gradients up to grad_W's summation
    order; without autograd it runs whole (nothing to make gradients for). Counts the kernel's launches: one
    per chunk of rows, so the comparison cannot pass with the chunking off."""
    x, w, t = (a.to(device) for a in head_inputs(m, d, v, seed=7))
    rows_per_launch, real = [], cross_entropy.launch_cross_entropy
    monkeypatch.setattr(cross_entropy, "launch_cross_entropy",
                        lambda logits, *a, **k: rows_per_launch.append(logits.shape[0]) or real(logits, *a, **k))
    grads = []
    for launch in (CrossEntropyLaunch(), CrossEntropyLaunch(chunk_rows=chunk_rows)):
        xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = cross_entropy.linear_cross_entropy(xa, wa, t, dt, launch)
        (loss * 0.5).backward()
        grads.append((loss.detach(), xa.grad, wa.grad))
        with torch.no_grad():
            assert torch.equal(cross_entropy.linear_cross_entropy(x, w, t, dt, launch), loss.detach())
    chunks = [min(chunk_rows, m - start) for start in range(0, m, chunk_rows)]
    assert rows_per_launch == [m, m] + chunks + [m], rows_per_launch
    # only one input needing a gradient: only its GEMM runs, and the other gets none
    for needs in ("x", "w"):
        xa, wa = x.clone().requires_grad_(needs == "x"), w.clone().requires_grad_(needs == "w")
        cross_entropy.linear_cross_entropy(xa, wa, t, dt, CrossEntropyLaunch(chunk_rows=chunk_rows)).backward()
        assert (xa.grad is not None, wa.grad is not None) == (needs == "x", needs == "w")
        assert rel(xa.grad if needs == "x" else wa.grad, 2 * (grads[1][1] if needs == "x" else grads[1][2])) < 1e-6
    (l0, gx0, gw0), (l1, gx1, gw1) = grads
    assert torch.equal(l0, l1)  # the loss rows do not depend on the chunking
    # each row's G @ W alone: exact on the CPU; cuBLAS picks another algorithm (reduction order) for a GEMM of
    # fewer rows, measured 3.1e-4 on an H100 at 1024 of 4096 rows in bf16 (one bf16 rounding is 3.9e-3)
    assert rel(gx1, gx0) < (2e-3 if device != "cpu" and dt == torch.bfloat16 else 1e-6)
    assert rel(gw1, gw0) < (1e-2 if dt == torch.bfloat16 else 1e-6)  # chunks summed in fp32


@interpreter
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16])
def test_the_head_in_chunks_of_rows_on_the_interpreter(dt, monkeypatch):
    chunked_against_whole("cpu", 10, 16, 300, 4, dt, monkeypatch)  # chunks of 4, 4, 2


@pytest.mark.gpu
@cuda
def test_the_head_in_chunks_of_rows_on_gpu(monkeypatch):
    chunked_against_whole("cuda", 4096, 768, 32000, 1024, torch.bfloat16, monkeypatch)


@pytest.mark.parametrize("bad", [-1, True, 2.0])
def test_chunk_rows_must_be_a_count(bad):
    with pytest.raises(ValueError, match="chunk_rows must be an int >= 0"):
        CrossEntropyLaunch(chunk_rows=bad)
