"""The scatter-add embedding against F.embedding."""

import torch
import torch.nn.functional as F

from bitnet.model.kernels.embedding import scatter_add_embedding


def test_scatter_add_embedding_matches_f_embedding():
    """The CUDA embedding path (index_add_ backward), run here on CPU tensors: repeated tokens sum their rows."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(50, 8, generator=g)
    idx = torch.randint(0, 50, (3, 40), generator=g)  # 120 draws from 50 rows: many repeats
    idx[0, :5] = 7
    wa, wb = weight.clone().requires_grad_(), weight.clone().requires_grad_()
    ya, yb = scatter_add_embedding(idx, wa), F.embedding(idx, wb)
    assert torch.equal(ya, yb)
    dy = torch.randn(ya.shape, generator=g)
    ya.backward(dy)
    yb.backward(dy)
    torch.testing.assert_close(wa.grad, wb.grad)
    unused = torch.ones(50, dtype=torch.bool)
    unused[idx.unique()] = False
    assert (wa.grad[unused] == 0).all() and (wa.grad[7] != 0).all()
