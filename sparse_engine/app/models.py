"""The small models of the training CLI and experiments, as plain torch modules.

They use ``nn.Linear`` / ``nn.Conv2d`` everywhere a weight should be sparsified, so that
``sparse_engine.nn.sparsify`` finds them; biases, BatchNorm and LayerNorm stay dense (only weights with ndim >= 2 are factored).

* ``mlp``: LeNet-300-100 (784-300-100-10), the classic pruning benchmark for (Fashion-)MNIST.
* ``cnn``: a small ResNet for 1×28×28 inputs: a 3×3 stem and three basic blocks (16, 32, 64 channels;
  the last two stride 2), global average pooling, a linear classifier (~78k weights).
* ``transformer``: a 2-layer pre-norm encoder (d = 64, 4 heads, attention written with nn.Linear so every
  projection is sparsifiable), mean pooling, a linear classifier; for token sequences
  (``data.synthetic_sequences``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..export import io

MODELS = ("mlp", "cnn", "transformer")


def _kaiming(module: nn.Module) -> None:
    # Kaiming-normal fan-in init (He et al. 2015), as in the papers' networks.
    for mod in module.modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)


class MLP(nn.Module):
    """in → hidden... → classes with ReLU. Input (B, in) or (B, C, H, W) (flattened)."""

    def __init__(self, in_features: int = 784, hidden: tuple[int, ...] = (300, 100), n_classes: int = 10) -> None:
        super().__init__()
        sizes = (in_features, *hidden)
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.out = nn.Linear(sizes[-1], n_classes)
        _kaiming(self)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.out(x)

    def file_config(self) -> dict:
        """The constructor arguments, read off the layers (for sparse_engine.save / load)."""
        first = (list(self.hidden) or [self.out])[0]
        return {"in_features": int(first.in_features), "hidden": [int(h.out_features) for h in self.hidden],
                "n_classes": int(self.out.out_features)}

    @classmethod
    def from_file_config(cls, c: dict) -> MLP:
        return cls(int(c["in_features"]), tuple(int(h) for h in c["hidden"]), int(c["n_classes"]))


class BasicBlock(nn.Module):
    """Two 3×3 convs with BatchNorm and a residual (1×1 conv projection when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class SmallResNet(nn.Module):
    """ResNet-style CNN for (B, 1, 28, 28) (or flattened (B, 784)) inputs."""

    def __init__(self, in_channels: int = 1, n_classes: int = 10, widths: tuple[int, int, int] = (16, 32, 64),
                 image_size: int = 28) -> None:
        super().__init__()
        self.in_channels, self.image_size = in_channels, image_size
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        self.layer1 = BasicBlock(widths[0], widths[0])
        self.layer2 = BasicBlock(widths[0], widths[1], stride=2)
        self.layer3 = BasicBlock(widths[1], widths[2], stride=2)
        self.fc = nn.Linear(widths[2], n_classes)
        _kaiming(self)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            x = x.reshape(x.shape[0], self.in_channels, self.image_size, self.image_size)
        x = F.relu(self.bn(self.stem(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean((2, 3)))

    def file_config(self) -> dict:
        widths = [self.stem.out_channels, self.layer2.conv1.out_channels, self.layer3.conv1.out_channels]
        return {"in_channels": int(self.in_channels), "n_classes": int(self.fc.out_features),
                "widths": [int(w) for w in widths], "image_size": int(self.image_size)}

    @classmethod
    def from_file_config(cls, c: dict) -> SmallResNet:
        return cls(int(c["in_channels"]), int(c["n_classes"]), tuple(int(w) for w in c["widths"]),
                   int(c["image_size"]))


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate q, k, v, o nn.Linear projections (sparsifiable)."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        if d % heads:
            raise ValueError(f"d must be divisible by heads, got d={d}, heads={heads}")
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:  # (B, T, d)
        b, t, d = x.shape
        split = lambda z: z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.o(y.transpose(1, 2).reshape(b, t, d))


class EncoderBlock(nn.Module):
    def __init__(self, d: int, heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = SelfAttention(d, heads)
        self.fc1, self.fc2 = nn.Linear(d, mlp_ratio * d), nn.Linear(mlp_ratio * d, d)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyTransformer(nn.Module):
    """Token ids (B, T) int64 → class logits (B, n_classes)."""

    def __init__(self, vocab_size: int, seq_len: int, n_classes: int, d: int = 64, heads: int = 4,
                 layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d)
        self.pos = nn.Parameter(torch.randn(seq_len, d) * 0.02)
        self.blocks = nn.ModuleList(EncoderBlock(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, n_classes)
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.normal_(mod.weight, std=1.0 / math.sqrt(mod.in_features))
                nn.init.zeros_(mod.bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != torch.int64:
            raise ValueError(f"x must hold int64 token ids of shape (B, T), got {x.dtype}")
        h = self.embed(x) + self.pos[: x.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h).mean(1))

    def file_config(self) -> dict:
        return {"vocab_size": int(self.embed.num_embeddings), "seq_len": int(self.pos.shape[0]),
                "n_classes": int(self.head.out_features), "d": int(self.embed.embedding_dim),
                "heads": int(self.blocks[0].attn.heads), "layers": len(self.blocks)}

    @classmethod
    def from_file_config(cls, c: dict) -> TinyTransformer:
        return cls(int(c["vocab_size"]), int(c["seq_len"]), int(c["n_classes"]), int(c["d"]), int(c["heads"]),
                   int(c["layers"]))


# sparse_engine.load rebuilds these models from a file alone (no instance given) once this module is imported.
for _cls in (MLP, SmallResNet, TinyTransformer):
    io.register(_cls, _cls.file_config, _cls.from_file_config)


def build_model(
    name: str, input_shape: tuple[int, ...], n_classes: int, vocab_size: int | None = None
) -> nn.Module:
    """A fresh model by name for samples of ``input_shape`` (one sample, e.g. (784,) or (1, 28, 28))."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {name!r}")
    if name == "mlp":
        return MLP(math.prod(input_shape), (300, 100), n_classes)
    if name == "cnn":
        if math.prod(input_shape) != 784:
            raise ValueError(f"the cnn model expects 1×28×28 images, got samples of shape {input_shape}")
        return SmallResNet(1, n_classes)
    if vocab_size is None or len(input_shape) != 1:
        raise ValueError("the transformer model needs token sequences (a dataset with vocab_size), "
                         f"got samples of shape {input_shape} and vocab_size={vocab_size}")
    return TinyTransformer(vocab_size, input_shape[0], n_classes)
