"""SparseLinear, and the machinery it shares with the sparse convolutions.

A sparse layer holds its weight as a :class:`~sparse_engine.param.Parameterization` (``.param``: θ =
M ⊙ m ⊙ w, or θ = M ⊙ w for ``kind="masked"``) and a plain ``.bias``. The *layout* says how θ is stored
and multiplied:

==========  =========================  ==================================================================
layout      storage of m, w            forward
==========  =========================  ==================================================================
``dense``   dense (N, K) + bool mask   ``ops.masked_linear`` (θ built inside the matmul)
``block``   dense (N, K), block mask   ``ops.block_sparse_linear`` (skips empty tiles: the GPU path)
``csr``     values at active coords    ``ops.compact_linear`` (FLOPs and memory ∝ density)
``bsr``     values of active blocks    ``ops.compact_linear`` with blocks
``auto``    chosen per layer           the layout measured fastest for this shape, density, dtype and
                                       device (:mod:`sparse_engine.nn.autolayout`); dense unless a
                                       sparse path is more than 5 % faster
==========  =========================  ==================================================================

The layer never talks to kernels, only to :mod:`sparse_engine.ops`.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Callable

import torch
from torch import Tensor, nn

from .. import ops, records
from ..checks import check_choice, check_positive_int
from ..layout import (LAYOUTS, BSRIndex, CSRIndex, check_block_shape, check_mask, expand_block_mask,
                      reduce_to_blocks)
from ..masks import block_mask as _random_block_mask
from ..masks import check_density
from ..masks import random_mask as _random_mask
from ..param import KINDS, Parameterization, check_beta
from . import autolayout

log = logging.getLogger("sparse_engine")

_COMPACT = ("csr", "bsr")
_INDEX_FIELDS = ("crow", "col", "row", "ccol", "row_t", "perm")


# ------------------------------------------------------------------------------------------ checks


def is_block_aligned(mask2d: Tensor, block_shape: tuple[int, int]) -> bool:
    """True when every (bn, bk) block of the (N, K) bool mask is all on or all off."""
    blocks = reduce_to_blocks(mask2d, block_shape)
    return bool(torch.equal(expand_block_mask(blocks, block_shape, tuple(mask2d.shape)), mask2d))


def _compiling() -> bool:
    return torch.compiler.is_compiling()


# -------------------------------------------------------------------------------------- base class


class SparseModule(nn.Module):
    """Everything SparseLinear and the sparse convolutions share: the parameterization, its layout
    (including the automatic choice and storage conversions), masks, θ, and checkpoint loading.

    Subclasses set ``weight_shape`` and implement ``forward``, ``_auto_candidates`` and ``_auto_key``.
    """

    param: Parameterization
    bias: nn.Parameter | None

    # ----------------------------------------------------------------------------- construction

    def _configure(self, *, kind: str, density, mask, beta, layout: str, block_shape, seed) -> float:
        check_choice("kind", kind, KINDS)
        check_choice("layout", layout, LAYOUTS)
        density = check_density(density)
        beta = check_beta(beta)
        self.block_shape = check_block_shape(block_shape)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if mask is not None and density != 1.0:
            raise ValueError(f"give either mask or density, not both (got a mask and density={density})")
        if kind == "pilot" and mask is None and layout in ("block", "csr", "bsr"):
            raise ValueError(
                f"layout={layout!r} needs a mask, but kind='pilot' trains dense until it is pruned: use "
                "layout='dense' or 'auto' (density is then the pruning target), or pass a mask"
            )
        self.kind = kind
        self.layout = layout
        self.seed = seed
        self.beta_init = beta
        # PILoT has no mask while it trains: the requested density is the target of the later prune.
        self.target_density: float | None = density if (kind == "pilot" and mask is None) else None
        # Layout actually in use: "auto" stays unresolved (dense storage) until first use or tune().
        self._resolved: str | None = None if layout == "auto" else layout
        self._retune = False  # measure again at the next forward (request_retune)
        self._block_key: tuple | None = None
        for f in _INDEX_FIELDS:
            self.register_buffer(f"_bsr_{f}", None, persistent=False)
        return density

    def _make_mask(self, mask: Tensor | None, density: float, device) -> Tensor | None:
        """The initial bool mask of the weight's shape (None: no mask)."""
        shape = self.weight_shape
        if mask is not None:
            check_mask(mask, shape)
            mask = mask.to(device)
            if self.layout == "block" and not is_block_aligned(mask.reshape(shape[0], -1), self.block_shape):
                raise ValueError(
                    f"mask must be block-aligned (whole {self.block_shape} blocks on or off) "
                    "for layout='block'"
                )
            return mask
        if self.kind == "pilot":
            return None
        if density == 1.0:
            # Compact storage needs the pattern even when it is full.
            return torch.ones(shape, dtype=torch.bool, device=device) if self.layout in _COMPACT else None
        return self._draw_mask(density, device)

    def _draw_mask(self, density: float, device) -> Tensor:
        """A random mask at ``density``: exact to one weight for the element layouts; for the block
        layouts the nearest whole number of blocks, with a warning naming the achieved density when
        whole blocks cannot come within half a block of it, refused when no whole block would be kept (a
        warning when an element layout keeps no weight)."""
        shape, numel = self.weight_shape, math.prod(self.weight_shape)
        if self.layout not in ("block", "bsr"):
            if round(density * numel) == 0:  # exact to one weight, yet nothing trains: say so
                warnings.warn(f"{type(self).__name__}: density={density:g} keeps no weight of the {tuple(shape)} "
                              f"weight ({numel} weights; density >= {0.5 / numel:.3g} keeps one)", stacklevel=4)
            return _random_mask(shape, density, seed=self.seed, device=device)
        mask = _random_block_mask(shape, self.block_shape, density, seed=self.seed, device=device)
        rows, cols = shape[0], numel // shape[0]
        kept, block = int(mask.sum()), min(self.block_shape[0], rows) * min(self.block_shape[1], cols)
        if kept == 0:
            raise ValueError(f"density={density:g} keeps no whole block of the {tuple(shape)} weight with "
                             f"block_shape={self.block_shape}: give a larger density or a smaller block_shape")
        if abs(kept - density * numel) > block / 2:
            warnings.warn(f"{type(self).__name__} {tuple(shape)} layout={self.layout!r}: density={density:g} "
                          f"rounds to whole {self.block_shape} blocks (edge blocks partial): achieved density "
                          f"{kept / numel:.4f}; a block_shape that divides the weight or another density comes "
                          "closer", stacklevel=4)
        return mask

    def _build_param(self, theta: Tensor, mask: Tensor | None) -> None:
        storage = self._resolved if self._resolved in _COMPACT else "dense"
        self.param = Parameterization(
            theta,
            kind=self.kind,
            mask=mask,
            beta=self.beta_init,
            layout=storage,
            block_shape=self.block_shape,
        )
        self._refresh_block_index()

    # ----------------------------------------------------------------------------------- views

    @property
    def storage(self) -> str:
        """How m and w are stored: "dense", "csr" or "bsr"."""
        return self.param.layout

    @property
    def resolved_layout(self) -> str | None:
        """The layout in use (for layout="auto": the measured choice; None until it is made)."""
        return self._resolved

    def _compact_index(self) -> CSRIndex | BSRIndex:
        """The index of a compact storage (built from the parameterization's buffers, not validated)."""
        return self.param.index

    def _block_index(self) -> BSRIndex:
        """The BSR index of the block path (built once per mask, cached in non-persistent buffers)."""
        if not _compiling():
            self._refresh_block_index()
        return BSRIndex(
            tuple(self.param.shape2d),
            self.block_shape,
            **{f: getattr(self, f"_bsr_{f}") for f in _INDEX_FIELDS},
        )

    def _refresh_block_index(self) -> None:
        """(Re)build the BSR index of the block path when the mask changed (new tensor or in-place edit)."""
        if self._resolved != "block":
            return
        mask = self.param.mask
        key = None if mask is None else (id(mask), mask._version)
        if key == self._block_key and self._bsr_crow is not None:
            return
        mask2 = (
            mask
            if mask is not None
            else torch.ones(self.param.shape2d, dtype=torch.bool, device=self.param.w.device)
        )
        if not is_block_aligned(mask2, self.block_shape):
            raise RuntimeError(
                "the mask of this layout='block' layer is no longer block-aligned "
                f"({self.block_shape} blocks); "
                "the block kernel would train whole blocks: set a block-aligned mask or use layout='dense'"
            )
        index = BSRIndex.from_mask(mask2, self.block_shape)
        for f in _INDEX_FIELDS:
            setattr(self, f"_bsr_{f}", getattr(index, f))
        self._block_key = key

    # ------------------------------------------------------------------------------- θ and mask

    def theta(self) -> Tensor:
        """θ = M ⊙ m ⊙ w, dense, the weight's shape, differentiable in m and w."""
        p = self.param
        values = p.values()
        if p.layout != "dense":
            values = self._compact_index().scatter(values)
        return values.reshape(self.weight_shape)

    @property
    def weight(self) -> Tensor:
        """θ as a dense tensor (read-only, differentiable): for code that reads ``module.weight``."""
        return self.theta()

    def mask2d(self) -> Tensor | None:
        """The bool mask as the (N, K) matrix (None: no mask). BSR: the area of the active blocks."""
        p = self.param
        return p.mask if p.layout == "dense" else self._compact_index().to_mask()

    def dense_mask(self) -> Tensor | None:
        """The bool mask in the weight's shape (None: no mask)."""
        mask = self.mask2d()
        return None if mask is None else mask.reshape(self.weight_shape)

    def nnz(self) -> int:
        """Number of trainable (unmasked) weights."""
        mask = self.mask2d()
        return math.prod(self.weight_shape) if mask is None else int(mask.sum())

    def density(self) -> float:
        """Fraction of the weight that is not masked."""
        return self.nnz() / math.prod(self.weight_shape)

    @torch.no_grad()
    def set_mask(self, mask: Tensor | None) -> None:
        """Replace the mask (dense storage: layouts dense, block, unresolved auto).

        Coordinates leaving the mask get θ = 0; entering ones start at θ = 0 (see Parameterization.set_mask).
        """
        if mask is not None:
            check_mask(mask, self.weight_shape)
            if self._resolved == "block" and not is_block_aligned(
                mask.reshape(self.weight_shape[0], -1).to(self.param.w.device), self.block_shape
            ):
                raise ValueError(
                    f"mask must be block-aligned (whole {self.block_shape} blocks on or off) "
                    "for layout='block'"
                )
        if self.storage != "dense":
            raise RuntimeError(
                f"set_mask() needs dense storage; this layer stores {self.storage!r} (fixed pattern): "
                "rebuild it with from_dense(..., mask=...) instead"
            )
        self.param.set_mask(mask)
        self._refresh_block_index()

    # --------------------------------------------------------------------------- storage changes

    @torch.no_grad()
    def _set_storage(self, storage: str, mask2d: Tensor | None = None, block_shape=None) -> None:
        """Move m and w to another storage ("dense", "csr", "bsr"), keeping every value exactly.

        The Parameterization object and its Parameter objects stay the same (only their data changes),
        so references held elsewhere (an optimizer created before the first forward) stay valid.
        Optimizer *state* does not follow: change layouts (tune()) before training.
        """
        old = self.param
        if block_shape is not None:
            self.block_shape = tuple(block_shape)
        if mask2d is None:
            mask2d = self.mask2d()
        if storage == old.layout and storage == "dense" and mask2d is old.mask:
            return
        if storage != "dense" and mask2d is None:
            mask2d = torch.ones(old.shape2d, dtype=torch.bool, device=old.w.device)
        # Current factors as dense (N, K) matrices: pruned coordinates hold w = 0, m = sqrt(β).
        dense_w, dense_m = self._dense_factors()
        new = Parameterization(
            dense_w.reshape(self.weight_shape),
            kind=old.kind,
            mask=None if mask2d is None else mask2d.reshape(self.weight_shape),
            beta=float(old.beta),
            layout=storage,
            block_shape=self.block_shape,
        )
        if storage == "dense":
            idx = None
            new_w, new_m = dense_w, dense_m
            if mask2d is not None:
                new_w = torch.where(mask2d, dense_w, torch.zeros_like(dense_w))
                if dense_m is not None:
                    new_m = torch.where(mask2d, dense_m, new.m)
        else:
            idx = (
                CSRIndex.from_mask(mask2d)
                if storage == "csr"
                else BSRIndex.from_mask(mask2d, self.block_shape)
            )
            new_w = idx.gather(dense_w)
            new_m = None if dense_m is None else idx.gather(dense_m)
            if storage == "bsr" and new_m is not None:  # padding holds m = sqrt(β), w = 0 (as param makes it)
                new_m = torch.where(new.pad_mask, new_m, new.m)
        new.beta.copy_(old.beta)
        for name, values in (("w", new_w), ("m", new_m)):
            p_old, p_new = old._parameters.get(name), new._parameters.get(name)
            if p_new is None:
                continue
            if p_old is not None:
                p_old.data = values.to(p_new.dtype).contiguous()
                new._parameters[name] = p_old
            else:
                p_new.data = values.to(p_new.dtype).contiguous()
        old.__dict__.update(new.__dict__)
        if storage == "dense" and "pad_mask" in old._buffers:
            del old._buffers["pad_mask"]
        self._block_key = None
        self._refresh_block_index()

    def _dense_factors(self) -> tuple[Tensor, Tensor | None]:
        """(w, m) as dense (N, K) tensors (m None for kind masked); pruned coordinates: w = 0, m = sqrt(β)."""
        p = self.param
        if p.layout == "dense":
            return p.w.detach(), None if p.m is None else p.m.detach()
        index = self._compact_index()
        w = index.scatter(p.w.detach())
        if p.m is None:
            return w, None
        fill = torch.full(p.shape2d, math.sqrt(float(p.beta)), dtype=p.m.dtype, device=p.m.device)
        mask = self.mask2d()
        return w, torch.where(mask, index.scatter(p.m.detach()), fill)

    def declare_layout(self, layout: str) -> None:
        """Set the layout option (``"auto"``: not chosen yet) without converting the storage: for an empty
        layer about to load a state dict, which brings its own storage."""
        self.layout = check_choice("layout", layout, LAYOUTS)
        self._resolved = None if layout == "auto" else layout

    def use_layout(self, layout: str) -> None:
        """Switch the compute layout (the automatic choice, or a resumed run restoring it); storage follows."""
        storage = layout if layout in _COMPACT else "dense"
        self._resolved = layout
        if storage != self.storage:
            log.info(
                "sparse_engine: %s layer %s switches storage %s -> %s",
                type(self).__name__,
                tuple(self.weight_shape),
                self.storage,
                storage,
            )
            self._set_storage(storage)
        self._block_key = None
        self._refresh_block_index()

    # ---------------------------------------------------------------------------------- forward

    def _amp_dtype(self, input: Tensor) -> torch.dtype | None:
        """The autocast compute dtype for this call (None: autocast off, or a float64 layer, which
        autocast leaves alone as it does for nn.Linear)."""
        device_type = input.device.type
        if self.param.w.dtype == torch.float64 or not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)

    def forward(self, input: Tensor) -> Tensor:
        if self._resolved in _COMPACT and not self._retune and isinstance(self, SparseLinear):
            # eager compact layers: the lean op entry (it declines, None, whatever it does not cover)
            p = self.param
            b = p._buffers
            y = ops.compact_linear_eager(input, p.m, p.w, [b[f"index_{f}"] for f in _INDEX_FIELDS], self.bias,
                                         self.out_features, self.in_features)
            if y is not None:
                return y
        amp = self._amp_dtype(input) if isinstance(input, Tensor) else None
        self._check_input(input, amp)
        if amp is None:
            self._maybe_autotune(input)
            return self._compute(input, self._resolved or "dense")
        # Under autocast, like nn.Linear / nn.Conv: compute in the autocast dtype (the casts of m, w
        # and the bias are differentiable, so their gradients arrive in the parameters' own dtype).
        x = input.to(amp)
        with torch.autocast(input.device.type, enabled=False):
            self._maybe_autotune(x)
            return self._compute(x, self._resolved or "dense", amp)

    def _factors(self, dtype: torch.dtype | None) -> tuple[Tensor | None, Tensor, Tensor | None]:
        """(m, w, bias), cast to ``dtype`` when given (autocast)."""
        p = self.param
        m, w, b = p.m, p.w, self.bias
        if dtype is None or dtype == w.dtype:
            return m, w, b
        return (None if m is None else m.to(dtype)), w.to(dtype), (None if b is None else b.to(dtype))

    def _check_dtype_device(self, input: Tensor, amp: torch.dtype | None) -> None:
        w = self.param.w
        if amp is None and input.dtype != w.dtype:
            raise ValueError(f"input must have the layer's dtype {w.dtype}, got {input.dtype}")
        if amp is not None and not input.is_floating_point():
            raise ValueError(f"input must be floating point, got {input.dtype}")
        if input.device != w.device:
            raise ValueError(f"input must be on the layer's device {w.device}, got {input.device}")

    # ------------------------------------------------------------------------------ auto layout

    def _maybe_autotune(self, input: Tensor) -> None:
        if self.layout != "auto" or _compiling() or (self._resolved is not None and not self._retune):
            return
        # Measuring needs autograd and the storage switch makes new tensors: neither may be an
        # inference tensor, even when the first forward runs under torch.inference_mode().
        with torch.inference_mode(False):
            self._autotune(input)

    def request_retune(self) -> None:
        """Measure the layout choice again at the next forward (``layout="auto"`` only)."""
        self._retune = True

    def _autotune(self, input: Tensor) -> None:
        mask2d = self.mask2d()
        candidates = self._auto_candidates(mask2d)
        if len(candidates) <= 1:
            decision = autolayout.Decision("dense", {}, "", "only candidate")
        else:
            decision = autolayout.choose(
                self._auto_key(input, mask2d),
                lambda: self._auto_runners(input, mask2d, candidates),
                retune=self._retune,
            )
        self._retune = False
        self.autolayout_decision = decision
        self.use_layout(decision.layout)

    def _auto_candidates(self, mask2d: Tensor | None) -> list[str]:
        raise NotImplementedError

    def _auto_key(self, input: Tensor, mask2d: Tensor | None) -> dict:
        raise NotImplementedError

    def _auto_runners(
        self, input: Tensor, mask2d: Tensor | None, candidates: list[str]
    ) -> dict[str, Callable]:
        raise NotImplementedError

    def _probe(self, layout: str, mask2d: Tensor | None, dtype: torch.dtype) -> "SparseModule":
        """A throw-away copy of this layer in ``layout`` with fresh random weights of ``dtype`` (timing)."""
        probe = self._empty_copy()
        if probe.bias is not None:
            probe.bias = nn.Parameter(probe.bias.detach().to(dtype))
        theta = torch.randn(self.weight_shape, dtype=dtype, device=self.param.w.device)
        probe._resolved = layout
        probe.layout = layout
        probe._build_param(theta, None if mask2d is None else mask2d.reshape(self.weight_shape))
        return probe

    def _empty_copy(self) -> "SparseModule":
        raise NotImplementedError

    # ------------------------------------------------------------------------------ checkpoints

    def _type_name(self) -> str:
        """The layer's class name, also when FSDP2's fully_shard has swapped in its subclass FSDP<name>."""
        return next(c for c in type(self).__mro__ if c.__module__.startswith("sparse_engine")).__name__

    def get_extra_state(self) -> Tensor:
        """This layer's options (type, layout and its resolution, block shape, seed, β, PILoT's target
        density) as one int64 tensor (:mod:`sparse_engine.records`): what a loader needs to rebuild it."""
        return records.encode(
            "SparseModule", type=self._type_name(), layout=self.layout, resolved=self._resolved,
            block_n=self.block_shape[0], block_k=self.block_shape[1], seed=self.seed, beta=self.beta_init,
            target_density=self.target_density,
        )

    def set_extra_state(self, state: Tensor) -> None:
        # The checkpoint's seed, β and target density describe its weights: adopted. The layout stays this
        # layer's own (its storage is restored by _after_load); an "auto" layer adopts the choice the saving
        # process measured.
        _, rec = records.decode(state, "SparseModule")
        self.seed, self.beta_init, self.target_density = rec["seed"], rec["beta"], rec["target_density"]
        if self.layout == "auto" and rec["layout"] == "auto":
            self._loaded_resolved = rec["resolved"]

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # A checkpoint may hold another storage than this module (an "auto" layer resolved to csr in the
        # process that saved it) or another number of active weights: adopt its structure first, so
        # that the tensors load exactly; an explicit layout is restored afterwards (post hook).
        p = prefix + "param."
        if p + "w" not in state_dict and prefix + "weight" in state_dict:
            raise ValueError(
                f"{prefix[:-1] or 'model'}: the checkpoint holds a dense weight ({prefix}weight) but this layer is a "
                f"{type(self).__name__} (kind={self.kind}, layout={self.layout}): load the checkpoint into the "
                "dense model, then sparsify it"
            )
        if p + "w" in state_dict:
            record = state_dict.get(p + "_extra_state")
            if record is not None:  # kind and shape first: a mismatch changes nothing
                self.param.check_record(record, storage=False)
            try:
                self._adopt_structure(state_dict, p)
            except (ValueError, RuntimeError) as e:
                error_msgs.append(f"{prefix}param: cannot adopt the checkpoint's weight structure: {e}")
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        key = prefix + "_extra_state"
        if key not in state_dict and key in missing_keys:  # written before layers had a record
            missing_keys.remove(key)

    def _adopt_structure(self, state_dict, p: str) -> None:
        # Same storage: the parameterization loads (and resizes) by itself. Another storage: convert
        # ours to the checkpoint's pattern first, so that every tensor loads exactly.
        w = state_dict[p + "w"]
        if p + "index_crow" in state_dict:
            storage = "bsr" if w.dim() == 3 else "csr"
            if storage == self.storage:
                return
            tensors = {"crow": state_dict[p + "index_crow"], "col": state_dict[p + "index_col"]}
            shape2d = tuple(self.param.shape2d)
            bs = None
            if storage == "csr":
                mask2d = CSRIndex.from_tensors(shape2d, tensors).to_mask()
            else:
                bs = (int(w.shape[1]), int(w.shape[2]))
                mask2d = BSRIndex.from_tensors(
                    shape2d, {**tensors, "block_shape": torch.tensor(bs)}
                ).to_mask()
            self._set_storage(storage, mask2d.to(self.param.w.device), bs)
            self._loaded_storage = storage
        elif self.storage != "dense":
            mask = state_dict.get(p + "mask")
            self._set_storage("dense", None if mask is None else mask.to(self.param.w.device, torch.bool))
            self._loaded_storage = "dense"

    @staticmethod
    def _after_load(module: "SparseModule", incompatible) -> None:
        storage = module.__dict__.pop("_loaded_storage", None)
        if storage is not None:
            want = (
                module.layout if module.layout in _COMPACT else ("dense" if module.layout != "auto" else None)
            )
            if module.layout == "auto":
                module._resolved = storage if storage in _COMPACT else None
            elif want != storage:
                module._set_storage(want)
        resolved = module.__dict__.pop("_loaded_resolved", "unset")
        if resolved != "unset" and (resolved if resolved in _COMPACT else "dense") == module.storage:
            module._resolved = resolved  # the saved choice, where the storage allows it
        module._block_key = None
        module._refresh_block_index()

    def _register_hooks(self) -> None:
        self.register_load_state_dict_post_hook(SparseModule._after_load)

    def _configure_copy(self, obj: "SparseModule") -> "SparseModule":
        """The end of ``_empty_copy``: ``obj`` takes this layer's options, a dense layout and a bias of the
        right shape (values are filled in by the caller)."""
        obj._configure(
            kind=self.kind,
            density=1.0,
            mask=None,
            beta=self.beta_init,
            layout="dense",
            block_shape=self.block_shape,
            seed=self.seed,
        )
        obj.bias = None if self.bias is None else nn.Parameter(torch.randn_like(self.bias))
        return obj

    def _adopt(self, module: nn.Module, options: dict) -> None:
        """The end of ``from_dense``: take ``module``'s weight (masked by ``options``), bias and mode.

        ``options``: the keyword arguments of ``_configure`` (kind, density, mask, beta, layout, ...).
        """
        density = self._configure(**options)
        weight = module.weight.detach()
        self.bias = None if module.bias is None else nn.Parameter(module.bias.detach().clone())
        self._build_param(weight, self._make_mask(options["mask"], density, weight.device))
        self._register_hooks()
        self.train(module.training)

    # ---------------------------------------------------------------------------------- display

    def _sparse_repr(self) -> str:
        lay = self.layout if self.layout != "auto" else f"auto({self._resolved or 'unresolved'})"
        s = f"kind={self.kind}, layout={lay}"
        if self.param.layout == "dense" and self.param.mask is None:
            s += ", density=1 (no mask)"
        else:
            s += f", density={self.density():.4g}"
        if self.target_density is not None and self.target_density < 1.0:
            s += f", target_density={self.target_density:g}"
        return s


# ---------------------------------------------------------------------------------------- Linear


class SparseLinear(SparseModule):
    """A Linear layer y = x θᵀ + b whose weight θ = M ⊙ m ⊙ w is sparse.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        kind: "masked" (θ trained directly, static mask), "signin" (m ⊙ w with periodic reset to β) or
            "pilot" (m ⊙ w, no mask until pruned; ``density`` is recorded as ``target_density``).
        density: fraction of active weights, in (0, 1]; a random mask with exactly
            ``round(density * numel)`` active entries is drawn from ``seed`` (whole blocks for layouts
            "block" and "bsr"). Give either ``density`` or ``mask``.
        mask: a bool tensor of the weight's shape (out_features, in_features).
        beta: the scale m² − w² of the initial factorisation (signin/pilot).
        layout: "dense" | "block" | "csr" | "bsr" | "auto" (module docstring).
        block_shape: (bn, bk) blocks of the "block" and "bsr" layouts.
        seed: seed of the random mask.

    Shapes: input (..., in_features) -> output (..., out_features).
    The weight is initialised like ``nn.Linear`` (Kaiming uniform, same random stream), then masked.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, *, kind: str = "masked",
        density: float = 1.0, mask: Tensor | None = None, beta: float = 1.0, layout: str = "dense",
        block_shape: tuple[int, int] = (32, 32), seed: int = 0, device=None, dtype=None,
    ) -> None:
        super().__init__()
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("out_features", out_features)
        self.weight_shape = (out_features, in_features)
        density = self._configure(kind=kind, density=density, mask=mask, beta=beta, layout=layout,
                                  block_shape=block_shape, seed=seed)
        factory = {"device": device, "dtype": dtype}
        # Same calls in the same order as nn.Linear.reset_parameters: same values for the same RNG state.
        weight = torch.empty(self.weight_shape, **factory)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
            bound = 1 / math.sqrt(in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        else:
            self.register_parameter("bias", None)
        self._build_param(weight, self._make_mask(mask, density, weight.device))
        self._register_hooks()

    @classmethod
    def from_dense(
        cls, module: nn.Linear, *, kind: str = "masked", mask: Tensor | None = None, density: float = 1.0,
        beta: float = 1.0, layout: str = "dense", block_shape: tuple[int, int] = (32, 32), seed: int = 0,
    ) -> "SparseLinear":
        """A SparseLinear holding ``module``'s weight (masked) and bias, on its device and dtype."""
        if not isinstance(module, nn.Linear):
            raise TypeError(f"module must be an nn.Linear, got {type(module).__name__}")
        obj = cls.__new__(cls)
        SparseModule.__init__(obj)
        obj.in_features, obj.out_features = module.in_features, module.out_features
        obj.weight_shape = (module.out_features, module.in_features)
        obj._adopt(module, dict(kind=kind, density=density, mask=mask, beta=beta, layout=layout,
                                block_shape=block_shape, seed=seed))
        return obj

    def to_dense(self) -> nn.Linear:
        """A plain nn.Linear with weight θ = M ⊙ m ⊙ w (same device and dtype)."""
        theta = self.theta().detach()
        out = nn.Linear(
            self.in_features, self.out_features, self.bias is not None, device=theta.device, dtype=theta.dtype
        )
        with torch.no_grad():
            out.weight.copy_(theta)
            if self.bias is not None:
                out.bias.copy_(self.bias)
        out.train(self.training)
        return out

    def _empty_copy(self) -> "SparseLinear":
        obj = SparseLinear.__new__(SparseLinear)
        SparseModule.__init__(obj)
        obj.in_features, obj.out_features, obj.weight_shape = (
            self.in_features,
            self.out_features,
            self.weight_shape,
        )
        return self._configure_copy(obj)

    def _check_input(self, input: Tensor, amp: torch.dtype | None = None) -> None:
        if not isinstance(input, Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
        if input.dim() < 1 or input.shape[-1] != self.in_features:
            raise ValueError(
                f"input must have last dim {self.in_features} (in_features), got shape {tuple(input.shape)}"
            )
        self._check_dtype_device(input, amp)

    def _compute(self, input: Tensor, layout: str, dtype: torch.dtype | None = None) -> Tensor:
        p = self.param
        m, w, bias = self._factors(dtype)
        if layout == "block":
            return ops.block_sparse_linear(input, m, w, self._block_index(), bias)
        if p.layout != "dense":
            return ops.compact_linear(input, m, w, p.index, bias)
        return ops.masked_linear(input, m, w, p.mask, bias)

    # ------------------------------------------------------------------------------ auto layout

    def _auto_candidates(self, mask2d: Tensor | None) -> list[str]:
        if mask2d is None:
            return ["dense"]
        out = ["dense", "csr"]
        if is_block_aligned(mask2d, self.block_shape):
            out += ["block", "bsr"]
        return out

    def _auto_key(self, input: Tensor, mask2d: Tensor | None) -> dict:
        rows = input.numel() // self.in_features
        return autolayout.make_key("linear", self.weight_shape, mask2d, input.dtype, self.param.w.device, rows=rows,
                                   kind=self.kind, block_shape=self.block_shape)

    def _auto_runners(self, input: Tensor, mask2d, candidates: list[str]) -> dict[str, Callable]:
        rows = max(1, input.numel() // self.in_features)
        x = torch.randn(rows, self.in_features, dtype=input.dtype, device=input.device, requires_grad=True)
        runners = {}
        for layout in candidates:
            probe = self._probe(layout, mask2d, input.dtype)
            runners[layout] = fwd_bwd_runner(probe, x, layout)
        return runners

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, " + self._sparse_repr()
        )


def fwd_bwd_runner(probe: SparseModule, x: Tensor, layout: str) -> Callable[[], None]:
    """One forward + backward of ``probe`` on ``x`` (grads by autograd.grad: nothing accumulates)."""
    params = [t for t in (x, probe.param.m, probe.param.w, probe.bias) if t is not None]

    def run() -> None:
        with torch.enable_grad():
            y = probe._compute(x, layout)
            torch.autograd.grad(y, params, torch.ones_like(y))

    run.layout = layout  # type: ignore[attr-defined]  # lets tests and logs tell the runners apart
    return run
