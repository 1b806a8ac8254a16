"""torch.compile(fullgraph=True) of a model holding sparse layers: forward and backward match eager.

One compile for every layout path (the first compile costs ~20 s on a 2-core CPU): masked_linear
(dense), compact_linear (csr) and block_sparse_linear (block) linears, a materialised-θ convolution and
an unfold + compact convolution.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from sparse_engine.layout import expand_block_mask
from sparse_engine.nn import SparseConv2d, SparseLinear


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = SparseConv2d(3, 8, 3, padding=1, kind="signin", density=0.4, seed=1)
        self.conv2 = SparseConv2d(8, 8, 3, stride=2, padding=1, padding_mode="reflect", kind="masked", density=0.5,
                                  layout="csr", seed=2)
        self.fc1 = SparseLinear(8 * 4 * 4, 32, kind="signin", density=0.3, layout="csr", seed=3)
        blocks = torch.rand(2, 2) < 0.6
        blocks[0, 0] = True
        self.fc2 = SparseLinear(
            32,
            32,
            kind="pilot",
            layout="block",
            block_shape=(16, 16),
            mask=expand_block_mask(blocks, (16, 16), (32, 32)),
        )
        self.fc3 = SparseLinear(32, 5, kind="signin", density=0.5)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.fc1(x.flatten(1)))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_compile_fullgraph_matches_eager():
    eager = Net()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    x = torch.randn(4, 3, 8, 8)
    y_eager = eager(x)
    y_eager.square().sum().backward()
    y_comp = compiled(x)
    y_comp.square().sum().backward()
    torch.testing.assert_close(y_comp, y_eager, rtol=1e-5, atol=1e-5)
    ge, gc = _grads(eager), _grads(compiled_model)
    assert set(ge) == set(gc) and len(ge) == 14  # m, w of 4 factored layers, w of 1 masked, 5 biases
    for name in ge:
        torch.testing.assert_close(gc[name], ge[name], rtol=1e-4, atol=1e-5, msg=name)
    # a second call with new data reuses the graph and still matches
    x2 = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(compiled(x2), eager(x2), rtol=1e-5, atol=1e-5)
