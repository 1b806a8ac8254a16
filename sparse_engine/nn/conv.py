"""SparseConv2d and SparseConv1d: convolutions whose weight θ = M ⊙ m ⊙ w is sparse.

Every ``nn.Conv2d`` / ``nn.Conv1d`` option is supported (stride, padding as ints or "same"/"valid",
dilation, groups, bias, padding_mode zeros/reflect/replicate/circular); the output equals
``F.conv2d`` with the masked θ.

Two ways to compute:

* materialise θ with ``param.theta()`` (one fused reparam; the weight is small next to the
  activations) and run the library convolution, whose dθ the reparam backward maps to (g_m, g_w).
  Layouts dense, block and any grouped convolution.
* compact (layouts csr and bsr, ``groups == 1``): FLOPs ∝ density. CSR on CPU with dilation 1 runs the
  direct sparse convolution ``ops.sparse_conv2d`` (C++: no im2col); everything else pads, unfolds the
  input into patches (B·L, C·kh·kw) and multiplies by the compact weight with ``ops.compact_linear``.
  ``layout="auto"`` picks a compact layout only where it is measured more than 5 % faster than the dense
  convolution (see :mod:`sparse_engine.nn.autolayout`).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..ops import backends
from ..layout import CSRIndex
from ..checks import check_positive_int
from . import autolayout
from .linear import SparseModule, fwd_bwd_runner

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _tuple(name: str, value, n: int, *, minimum: int) -> tuple[int, ...]:
    values = (value,) * n if isinstance(value, int) and not isinstance(value, bool) else value
    try:
        values = tuple(values)
    except TypeError:
        raise ValueError(f"{name} must be an int or a tuple of {n} ints, got {value!r}") from None
    if len(values) != n or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in values):
        raise ValueError(f"{name} must be an int >= {minimum} or a tuple of {n} such ints, got {value!r}")
    return values


def _channels_last(t: Tensor) -> bool:
    """Whether 4-D t has the strides torch gives a channels_last tensor of its shape, and not the contiguous
    ones (with one channel both formats are contiguous, but .to(memory_format=...) still sets them)."""
    if t.dim() != 4:
        return False
    cl = torch.empty(t.shape, device="meta", memory_format=torch.channels_last).stride()
    return t.stride() == cl and t.stride() != torch.empty(t.shape, device="meta").stride()


class _SparseConvNd(SparseModule):
    """What SparseConv1d and SparseConv2d share; a subclass sets only ``_nd`` and ``_dense_cls``."""

    _nd: int = 2
    _dense_cls: type = nn.Conv2d

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
        groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *, kind: str = "masked",
        density: float = 1.0, mask: Tensor | None = None, beta: float = 1.0, layout: str = "dense",
        block_shape: tuple[int, int] = (32, 32), seed: int = 0, device=None, dtype=None,
    ) -> None:
        super().__init__()
        self._setup_conv(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode
        )
        density = self._configure(kind=kind, density=density, mask=mask, beta=beta, layout=layout,
                                  block_shape=block_shape, seed=seed)
        weight = self._init_weights(bias, device, dtype)
        self._build_param(weight, self._make_mask(mask, density, weight.device))
        self._register_hooks()


    def _setup_conv(
        self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode
    ):
        nd = self._nd
        self.in_channels = check_positive_int("in_channels", in_channels)
        self.out_channels = check_positive_int("out_channels", out_channels)
        self.groups = check_positive_int("groups", groups)
        if in_channels % groups:
            raise ValueError(
                f"groups must divide in_channels, got in_channels={in_channels}, groups={groups}"
            )
        if out_channels % groups:
            raise ValueError(
                f"groups must divide out_channels, got out_channels={out_channels}, groups={groups}"
            )
        self.kernel_size = _tuple("kernel_size", kernel_size, nd, minimum=1)
        self.stride = _tuple("stride", stride, nd, minimum=1)
        self.dilation = _tuple("dilation", dilation, nd, minimum=1)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(
                    f"padding must be 'same', 'valid', an int or a tuple of ints, got {padding!r}"
                )
            if padding == "same" and any(s != 1 for s in self.stride):
                raise ValueError(f"padding='same' needs stride 1 (as in torch), got stride={stride!r}")
            self.padding: str | tuple[int, ...] = padding
        else:
            self.padding = _tuple("padding", padding, nd, minimum=0)
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}")
        self.padding_mode = padding_mode
        # F.pad takes (last dim left, right, previous dim left, right, ...); "same" may be asymmetric.
        pads = [0, 0] * nd
        for i in range(nd):
            j = nd - 1 - i
            if self.padding == "same":
                total = self.dilation[i] * (self.kernel_size[i] - 1)
                pads[2 * j], pads[2 * j + 1] = total // 2, total - total // 2
            elif self.padding != "valid":
                pads[2 * j] = pads[2 * j + 1] = self.padding[i]
        self._reversed_padding_repeated_twice = pads
        self.weight_shape = (out_channels, in_channels // groups) + self.kernel_size
        if nd == 2:
            # The memory format Module.to(memory_format=...) gives the model's 4-D tensors. An input that is
            # contiguous in both formats (one channel, or 1x1 images) does not tell it, and nn.Conv2d then
            # follows its weight's format; the compact layouts' values are 1-D, so this 1x2x1x2 marker
            # (two formats, two stride patterns) stands in for the weight. Not saved (state_dict).
            self.register_buffer("_format_marker", torch.zeros(1, 2, 1, 2), persistent=False)

    def _init_weights(self, bias: bool, device, dtype) -> Tensor:
        factory = {"device": device, "dtype": dtype}
        # The calls of torch's _ConvNd.reset_parameters, in its order: same values for the same RNG state.
        weight = torch.empty(self.weight_shape, **factory)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_channels, **factory))
            fan_in = self.weight_shape[1] * math.prod(self.kernel_size)
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)
        else:
            self.register_parameter("bias", None)
        return weight

    # ------------------------------------------------------------------------------ conversions

    @classmethod
    def from_dense(
        cls, module: nn.Module, *, kind: str = "masked", mask: Tensor | None = None, density: float = 1.0,
        beta: float = 1.0, layout: str = "dense", block_shape: tuple[int, int] = (32, 32), seed: int = 0,
    ):
        """A sparse convolution with ``module``'s weight (masked), bias and options, device and dtype."""
        if not isinstance(module, cls._dense_cls):
            raise TypeError(f"module must be an {cls._dense_cls.__name__}, got {type(module).__name__}")
        obj = cls.__new__(cls)
        SparseModule.__init__(obj)
        obj._setup_conv(
            module.in_channels,
            module.out_channels,
            tuple(module.kernel_size),
            tuple(module.stride),
            module.padding if isinstance(module.padding, str) else tuple(module.padding),
            tuple(module.dilation),
            module.groups,
            module.padding_mode,
        )
        obj._adopt(module, dict(kind=kind, density=density, mask=mask, beta=beta, layout=layout,
                                block_shape=block_shape, seed=seed))
        if obj._nd == 2 and _channels_last(module.weight):  # a conv of a model already in channels_last
            obj._format_marker = obj._format_marker.contiguous(memory_format=torch.channels_last)
        return obj

    def to_dense(self) -> nn.Module:
        """The plain torch convolution with weight θ = M ⊙ m ⊙ w (same options, device, dtype)."""
        theta = self.theta().detach()
        out = self._dense_cls(*self._geometry(), self.bias is not None, self.padding_mode, device=theta.device,
                              dtype=theta.dtype)
        with torch.no_grad():
            out.weight.copy_(theta)
            if self.bias is not None:
                out.bias.copy_(self.bias)
        out.train(self.training)
        return out

    def _empty_copy(self):
        obj = type(self).__new__(type(self))
        SparseModule.__init__(obj)
        obj._setup_conv(*self._geometry(), self.padding_mode)
        if self._nd == 2:  # a probe times the layer in the model's memory format
            obj._format_marker = self._format_marker.clone()
        return self._configure_copy(obj)

    def _geometry(self) -> tuple:
        """in_channels, out_channels, kernel_size, stride, padding, dilation, groups: torch's argument order."""
        return (self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.dilation,
                self.groups)

    # ---------------------------------------------------------------------------------- forward

    def _check_input(self, input: Tensor, amp: torch.dtype | None = None) -> None:
        nd = self._nd
        if not isinstance(input, Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
        if input.dim() not in (nd + 1, nd + 2):
            raise ValueError(
                f"input must be {nd + 2}-D (batch, channels, *spatial) or {nd + 1}-D unbatched, "
                f"got shape {tuple(input.shape)}"
            )
        if input.shape[-nd - 1] != self.in_channels:
            raise ValueError(
                f"input must have {self.in_channels} channels (in_channels) at dim {-nd - 1}, "
                f"got shape {tuple(input.shape)}"
            )
        self._check_dtype_device(input, amp)

    def _memory_format(self) -> torch.memory_format | None:
        """torch.channels_last after model.to(memory_format=torch.channels_last), else None (every forward:
        one stride read; the marker's two formats differ in dim 1's stride, 2 against 1)."""
        marker = getattr(self, "_format_marker", None)
        return torch.channels_last if marker is not None and marker.stride(1) == 1 else None

    def _compute(self, input: Tensor, layout: str, dtype: torch.dtype | None = None) -> Tensor:
        if layout in ("csr", "bsr") and self.groups == 1:
            return self._compact_conv(input, dtype)
        weight = self.theta()
        bias = self.bias
        if dtype is not None and dtype != weight.dtype:
            weight, bias = weight.to(dtype), None if bias is None else bias.to(dtype)
        if self._memory_format() is not None:  # torch's conv follows its weight's format (θ is contiguous);
            weight = weight.to(memory_format=torch.channels_last)  # .to: explicit strides for 1 channel too
        return self._conv(input, weight, bias)

    def _conv(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        conv = F.conv2d if self._nd == 2 else F.conv1d
        if self.padding_mode != "zeros":
            padded = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return conv(padded, weight, bias, self.stride, 0, self.dilation, self.groups)
        return conv(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def _compact_conv(self, input: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """The compact layouts (csr, bsr), groups == 1 only.

        * CSR on CPU with dilation 1: the direct sparse convolution ``ops.sparse_conv2d`` (C++ kernel,
          no im2col: work ∝ nnz · B · Ho · Wo; the patch copy alone cost more than the dense conv).
        * otherwise (BSR, dilation > 1, CUDA tensors): im2col + compact_linear, patches (B·L, C·k) times
          θᵀ stored compactly. The direct op has no BSR or dilated kernel, and on CUDA compact_linear has
          GPU kernels where the direct op would only run its reference.
        """
        nd = self._nd
        unbatched = input.dim() == nd + 1
        x = input.unsqueeze(0) if unbatched else input
        pads = self._reversed_padding_repeated_twice
        if nd == 1:  # a 1-D convolution is a 2-D one over a height-1 image
            kernel, dilation, stride = (1,) + self.kernel_size, (1,) + self.dilation, (1,) + self.stride
        else:
            kernel, dilation, stride = self.kernel_size, self.dilation, self.stride
        index = self.param.index
        direct = (isinstance(index, CSRIndex) and x.device.type == "cpu" and all(d == 1 for d in dilation))
        # (left, right) per spatial dim, height first; 1-D: no height padding
        pairs = [(pads[2 * j], pads[2 * j + 1]) for j in reversed(range(nd))]
        if nd == 1:
            pairs = [(0, 0)] + pairs
        padding = (0, 0)
        if direct and self.padding_mode == "zeros" and all(a == b for a, b in pairs):
            padding = (pairs[0][0], pairs[1][0])  # the kernel pads with zeros itself: no padded copy
        elif any(pads):
            x = F.pad(x, pads, mode="constant" if self.padding_mode == "zeros" else self.padding_mode)
        if nd == 1:
            x = x.unsqueeze(2)
        spatial = [(x.shape[2 + i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1
                   for i in range(2)]
        if min(spatial) <= 0:
            raise ValueError(
                f"input is too small for kernel_size={self.kernel_size}, dilation={self.dilation} after "
                f"padding: got shape {tuple(input.shape)}"
            )
        m, w, bias = self._factors(dtype)
        if direct:
            y = ops.sparse_conv2d(x, m, w, index, kernel, bias, stride, padding,  # (B, out, *spatial)
                                  memory_format=self._memory_format() if nd == 2 else None)
            y = y.squeeze(2) if nd == 1 else y
            return y.squeeze(0) if unbatched else y
        # unfold orders a patch as (channel, kh, kw): the same order as the flattened weight rows.
        cols = F.unfold(x, kernel, dilation=dilation, padding=0, stride=stride)  # (B, C·k, L)
        y = ops.compact_linear(cols.transpose(1, 2), m, w, index, bias)  # (B, L, out)
        out_spatial = spatial if nd == 2 else spatial[1:]
        y = y.transpose(1, 2).reshape(x.shape[0], self.out_channels, *out_spatial)
        return y.squeeze(0) if unbatched else y

    # ------------------------------------------------------------------------------ auto layout

    def _auto_candidates(self, mask2d: Tensor | None) -> list[str]:
        if mask2d is None or self.groups != 1:
            return ["dense"]
        return ["dense", "csr"]

    def _auto_key(self, input: Tensor, mask2d: Tensor | None) -> dict:
        batch = 1 if input.dim() == self._nd + 1 else input.shape[0]
        extra = {
            "input": list(input.shape[-self._nd :]),
            "stride": list(self.stride),
            "dilation": list(self.dilation),
            "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
            "padding_mode": self.padding_mode,
            "groups": self.groups,
            # which kernel the csr candidate runs (make_key records compact_linear's backend only): a
            # measurement of the unfold path must not be reused for the direct kernel, nor the reverse
            "csr_conv": self._csr_conv_kernel(input),
        }
        if self._memory_format() is not None:  # measured in channels_last: not a decision for NCHW (or back)
            extra["memory_format"] = "channels_last"
        return autolayout.make_key(f"conv{self._nd}d", self.weight_shape, mask2d, input.dtype, self.param.w.device,
                                   rows=batch, kind=self.kind, block_shape=self.block_shape, extra=extra)

    def _csr_conv_kernel(self, input: Tensor) -> str:
        """What layout="csr" computes with for this input: the direct op on its backend, or unfold."""
        if input.device.type != "cpu" or any(d != 1 for d in self.dilation):
            return "unfold+compact_linear"
        return "sparse_conv2d:" + backends.which("sparse_conv2d_fwd", input.device, input.dtype)

    def _auto_runners(self, input: Tensor, mask2d, candidates: list[str]) -> dict[str, Callable]:
        x = torch.randn_like(input, requires_grad=True)  # (randn_like: in input's memory format)
        return {
            layout: fwd_bwd_runner(self._probe(layout, mask2d, input.dtype), x, layout) for layout in candidates
        }

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0,) * self._nd:
            s += (
                f", padding={self.padding!r}"
                if isinstance(self.padding, str)
                else f", padding={self.padding}"
            )
        if self.dilation != (1,) * self._nd:
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        return s + ", " + self._sparse_repr()


_DOC_ARGS = """
    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode:
            as the torch module (padding may be "same" or "valid").
        kind, density, mask, beta, layout, block_shape, seed: as :class:`SparseLinear`; ``mask`` has the
            weight's shape (out_channels, in_channels // groups, *kernel_size). Block layouts tile the
            matrix view (out_channels, in_channels // groups · prod(kernel_size)).

    The weight is initialised like the torch module (Kaiming uniform, same random stream), then masked.
"""


class SparseConv2d(_SparseConvNd):
    """A 2-D convolution with a sparse weight θ = M ⊙ m ⊙ w. Input (B, C, H, W) or (C, H, W)."""

    __doc__ = (__doc__ or "") + _DOC_ARGS
    _nd = 2
    _dense_cls = nn.Conv2d


class SparseConv1d(_SparseConvNd):
    """A 1-D convolution with a sparse weight θ = M ⊙ m ⊙ w. Input (B, C, L) or (C, L)."""

    __doc__ = (__doc__ or "") + _DOC_ARGS
    _nd = 1
    _dense_cls = nn.Conv1d
