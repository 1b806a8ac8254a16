"""Parameterizations of one weight tensor: Masked (θ), SignIn (m, w, β) and PILoT (m, w, β = 1).

A :class:`Parameterization` is a small ``nn.Module`` owning the trainable tensors of one weight and its
mask; SparseLinear / SparseConv2d hold one as ``.param``. Optimizers and method schedules act on it
through :meth:`step_targets`, :meth:`reset` and :meth:`set_mask`; modules only call :meth:`theta` (or
read the factors for the fused linear ops).

Storage: the weight is viewed as 2-D (N, K) (Conv: out × in/groups·kh·kw).
* ``layout="dense"``: m, w are (N, K) tensors and ``mask`` a bool (N, K) buffer (None: no mask, PILoT
  before pruning). Pruned coordinates hold w = 0, m = sqrt(β) (Masked: θ = 0).
* ``layout="csr" | "bsr"``: only active coordinates are stored: m, w are CSR values (nnz,) or BSR values
  (nnzb, bn, bk); the index tensors are buffers (they follow ``.to()`` and ``state_dict``), memory ∝
  density. BSR edge blocks are zero-padded; padding stays w = 0 (it is masked in ``step_targets``).

β is a buffer (float64, 0-dim) so that ``state_dict`` round-trips it exactly. β = 0 is accepted (the
balanced "spred" start that PILoT is compared against); a coordinate at θ = 0 then never moves.

Checkpoints: ``state_dict`` holds tensors only: m, w, the mask or the index tensors, β and an
``_extra_state`` record (kind, storage, block shape, weight shape as one int64 tensor, see
:mod:`sparse_engine.records`) that ``load_state_dict`` checks before it changes anything, so a checkpoint
never loads into a parameterization of another kind or shape. A compact-layout module accepts a checkpoint
with a different number of active coordinates (the tensors are resized in place: Parameter objects are
kept). Checkpoints written before the record existed (a dict) still load.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import distributed, ops, records
from .checks import check_choice
from .layout import BSRIndex, CSRIndex
from .ops.reference import factorize_ref

KINDS = ("masked", "signin", "pilot")
#: the layout.FORMATS a Parameterization trains in (no trainable N:M)
STORAGES = ("dense", "csr", "bsr")
_INDEX_FIELDS = ("crow", "col", "row", "ccol", "row_t", "perm")


class Parameterization(nn.Module):
    """The trainable form of one weight tensor (see module docstring).

    Args:
        theta: initial dense weight, any shape with ndim >= 2 (only its values are used; finite).
        kind: "masked" (θ trained directly), "signin" (m ⊙ w, periodic reset to β) or "pilot" (m ⊙ w,
            β = 1 init, dense until pruned).
        mask: bool tensor of θ's shape, or None (dense). The initial θ is masked.
        beta: the scale m² − w² >= 0 used to factor θ; ignored for "masked".
        layout: "dense" (dense tensors + mask), "csr" or "bsr" (compact storage of active coordinates).
        block_shape: BSR block shape (bn, bk).
    """

    def __init__(
        self,
        theta: Tensor,
        kind: str = "masked",
        mask: Tensor | None = None,
        beta: float = 1.0,
        layout: str = "dense",
        block_shape: tuple[int, int] = (32, 32),
    ) -> None:
        super().__init__()
        check_choice("kind", kind, KINDS)
        check_choice("layout", layout, STORAGES)
        if not isinstance(theta, Tensor):
            raise TypeError(f"theta must be a torch.Tensor, got {type(theta).__name__}")
        if theta.dim() < 2:
            raise ValueError("theta must have ndim >= 2 (Linear/Conv weight), got shape "
                             f"{tuple(theta.shape)}")
        if not theta.is_floating_point():
            raise ValueError(f"theta must be floating point, got {theta.dtype}")
        if not bool(torch.isfinite(theta).all()):
            raise ValueError("theta must be finite, got NaN or inf entries")
        check_beta(beta)
        if mask is not None:
            if not isinstance(mask, Tensor):
                raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
            _check_mask_dtype(mask)
            if tuple(mask.shape) != tuple(theta.shape):
                raise ValueError(f"mask must have the weight's shape {tuple(theta.shape)}, "
                                 f"got {tuple(mask.shape)}")
            mask = mask.to(device=theta.device)
        if layout != "dense" and mask is None:
            raise ValueError(f"layout={layout!r} needs a mask (compact storage of the active coordinates)")
        if layout == "bsr":
            bs = tuple(block_shape)
            if len(bs) != 2 or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in bs):
                raise ValueError(f"block_shape must be two positive ints, got {block_shape!r}")
        self.kind = kind
        self.layout = layout
        self.weight_shape = tuple(theta.shape)
        self.shape2d = (theta.shape[0], math.prod(theta.shape[1:]))
        self.block_shape = tuple(block_shape) if layout == "bsr" else (1, 1)
        self.register_buffer("beta", torch.tensor(float(beta), dtype=torch.float64))
        theta2 = theta.detach().reshape(self.shape2d)
        mask2 = None if mask is None else mask.reshape(self.shape2d)
        if layout == "dense":
            self.register_buffer("mask", mask2.clone() if mask2 is not None else None)
            values = theta2 if mask2 is None else torch.where(mask2, theta2, torch.zeros_like(theta2))
        else:
            index = (CSRIndex.from_mask(mask2) if layout == "csr"
                     else BSRIndex.from_mask(mask2, self.block_shape))
            for field in _INDEX_FIELDS:
                self.register_buffer(f"index_{field}", getattr(index, field))
            self.register_buffer("mask", None)
            values = index.gather(torch.where(mask2, theta2, torch.zeros_like(theta2)))
            if layout == "bsr":
                # A BSR layer trains whole blocks; only the zero padding of partial edge blocks is not a
                # weight, so it is masked out of training like a pruned coordinate.
                self.register_buffer("pad_mask", index.gather(torch.ones_like(theta2, dtype=torch.bool)))
        if kind == "masked":
            self.register_parameter("m", None)
            self.w = nn.Parameter(values.clone())
        else:
            # Pruned coordinates and BSR padding (θ = 0) come out as m = sqrt(β), w = 0, as after a reset.
            m, w = factorize_ref(values, float(beta))
            self.m = nn.Parameter(m)
            self.w = nn.Parameter(w)
        self.register_buffer("_last_sign", None, persistent=False)

    # ------------------------------------------------------------------------------------ structure

    @property
    def factored(self) -> bool:
        return self.kind != "masked"

    @property
    def index(self) -> CSRIndex | BSRIndex:
        """The compact index (built from the buffers, so it follows ``.to()`` and ``load_state_dict``)."""
        if self.layout == "dense":
            raise AttributeError("a dense-layout parameterization has no compact index")
        tensors = {f: getattr(self, f"index_{f}") for f in _INDEX_FIELDS}
        if self.layout == "csr":
            return CSRIndex(self.shape2d, **tensors)
        return BSRIndex(self.shape2d, self.block_shape, **tensors)

    def step_mask(self) -> Tensor | None:
        """Which stored coordinates train (None: all): the dense mask, or the BSR padding mask."""
        if self.layout == "dense":
            return self.mask
        return self.pad_mask if self.layout == "bsr" else None

    def dense_mask(self) -> Tensor | None:
        """The mask as a bool tensor of the weight's shape (None: no mask). BSR: whole active blocks."""
        if self.layout == "dense":
            return None if self.mask is None else self.mask.reshape(self.weight_shape)
        return self.index.to_mask().reshape(self.weight_shape)

    def density(self) -> float:
        """Fraction of the weight's coordinates that train (BSR: the area of the active blocks)."""
        if self.layout == "dense":
            return 1.0 if self.mask is None else self.mask.float().mean().item()
        return self.index.density

    # -------------------------------------------------------------------------------------- values

    def values(self) -> Tensor:
        """θ in storage form (dense (N, K) or compact values), differentiable in m and w."""
        return ops.reparam(self.m, self.w, self.mask if self.layout == "dense" else None)

    def local_values(self) -> Tensor:
        """:meth:`values` of the rows this rank holds (FSDP2 shards m and w by rows; the mask is whole on
        every rank); :meth:`values` itself when the parameters are not sharded."""
        if not distributed.is_sharded(self.w):
            return self.values()
        m = None if self.m is None else distributed.local(self.m)
        mask = distributed.local_rows(self.mask if self.layout == "dense" else None, self.w)
        return ops.reparam(m, distributed.local(self.w), mask)

    def theta(self) -> Tensor:
        """θ = M ⊙ m ⊙ w as a dense tensor of the weight's shape, differentiable in m and w."""
        values = self.values()
        if self.layout != "dense":
            values = self.index.scatter(values)
        return values.reshape(self.weight_shape)

    @torch.no_grad()
    def assign(self, theta: Tensor) -> None:
        """Set θ (dense, weight's shape): re-factored with the current β; pruned coordinates stay 0."""
        if not isinstance(theta, Tensor):
            raise TypeError(f"theta must be a torch.Tensor, got {type(theta).__name__}")
        if tuple(theta.shape) != self.weight_shape:
            raise ValueError(f"theta must have shape {self.weight_shape}, got {tuple(theta.shape)}")
        if not bool(torch.isfinite(theta).all()):
            raise ValueError("theta must be finite, got NaN or inf entries")
        theta2 = theta.to(device=self.w.device, dtype=self.w.dtype).reshape(self.shape2d)
        if self.layout == "dense":
            values = theta2 if self.mask is None else torch.where(self.mask, theta2, torch.zeros_like(theta2))
        else:
            values = self.index.gather(theta2)
        if not self.factored:
            self.w.copy_(values)
            return
        m, w = factorize_ref(values, float(self.beta))
        self.m.copy_(m)
        self.w.copy_(w)

    # -------------------------------------------------------------------------- method operations

    def step_targets(self) -> list[tuple[str, nn.Parameter, Tensor | None]]:
        """(role, parameter, mask for the optimizer) for every trainable tensor: role "m", "w" or "theta".

        The mask tells fused_step which coordinates are pruned (never updated, zero state).
        """
        step_mask = self.step_mask()
        if not self.factored:
            return [("theta", self.w, step_mask)]
        return [("m", self.m, step_mask), ("w", self.w, step_mask)]

    @torch.no_grad()
    def reset(self, beta: float | None = None) -> None:
        """Sign-In reset: re-factor θ to m² − w² = β (default: the stored β), θ unchanged."""
        if not self.factored:
            raise RuntimeError("reset() needs a factored parameterization (signin/pilot), this one is "
                               f"{self.kind!r}")
        if beta is not None:
            check_beta(beta)
            self.beta.fill_(beta)
        # FSDP2: m, w are shards (DTensors) and the mask is whole; the reset is elementwise
        m_loc, w_loc = distributed.local(self.m), distributed.local(self.w)
        m, w = ops.signin_reset(m_loc, w_loc, distributed.local_rows(self.step_mask(), self.m), float(self.beta))
        m_loc.copy_(m)
        w_loc.copy_(w)

    @torch.no_grad()
    def set_mask(self, mask: Tensor | None) -> None:
        """Replace the mask (dense layout only): PILoT's final prune, or RigL-style regrowth.

        Coordinates active before and after keep their m and w. Coordinates that leave the mask get
        θ = 0 (w = 0, m = sqrt(β)); coordinates that enter start from θ = 0 the same way. Optimizer
        state must be zeroed there by the optimizer.
        """
        if self.layout != "dense":
            raise RuntimeError("set_mask() works on the dense layout; this parameterization is "
                               f"{self.layout!r}")
        if mask is not None:
            if not isinstance(mask, Tensor):
                raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
            _check_mask_dtype(mask)
            if tuple(mask.shape) not in (self.weight_shape, self.shape2d):
                raise ValueError(f"mask must have shape {self.weight_shape}, got {tuple(mask.shape)}")
            mask = mask.to(device=self.w.device).reshape(self.shape2d).clone()
        old = self.mask
        keep = mask if old is None else (old if mask is None else old & mask)
        self.mask = mask
        if keep is None:  # no mask before or after: nothing changes
            return
        # FSDP2: m and w are row shards (the mask stays whole on every rank): change this rank's rows
        keep, w = distributed.local_rows(keep, self.w), distributed.local(self.w)
        if self.factored:
            m = distributed.local(self.m)
            m.copy_(torch.where(keep, m, torch.full_like(m, math.sqrt(float(self.beta)))))
        w.copy_(torch.where(keep, w, torch.zeros_like(w)))

    # --------------------------------------------------------------------------------- diagnostics

    @torch.no_grad()
    def diagnostics(self) -> dict[str, float]:
        """density, sign flips of θ since the last call (0 on the first), ‖θ‖₁, and for factored kinds
        β = m² − w² mean/min/max over the coordinates that train (the distribution Sign-In watches)."""
        values = self.values().detach()
        sign = torch.sign(values).to(torch.int8)
        last = self._last_sign
        flips = 0 if last is None or last.shape != sign.shape else int(((sign * last) < 0).sum())
        self._last_sign = sign
        out = {"density": self.density(), "sign_flips": flips, "l1": float(values.abs().sum())}
        if self.factored:
            beta = self.m.double() ** 2 - self.w.double() ** 2
            active = self.step_mask()
            if active is not None:
                beta = beta[active]
            if beta.numel():
                out.update(beta_mean=float(beta.mean()), beta_min=float(beta.min()),
                           beta_max=float(beta.max()))
        return out

    def extra_repr(self) -> str:
        return f"kind={self.kind}, layout={self.layout}, shape={self.weight_shape}, beta={float(self.beta):g}"

    def _apply(self, fn, recurse=True):
        # .half() / .to(dtype) cast every floating buffer; β stays float64 so that it remains exact.
        beta = self.beta
        out = super()._apply(fn, recurse)
        if self.beta.dtype != torch.float64:
            self._buffers["beta"] = beta.to(device=self.beta.device)
        return out

    # ---------------------------------------------------------------------------------- checkpoints

    def get_extra_state(self) -> Tensor:
        """The structure record (kind, storage, block shape, weight shape): one int64 tensor."""
        return records.encode("Parameterization", kind=self.kind, storage=self.layout, block_n=self.block_shape[0],
                              block_k=self.block_shape[1], shape=self.weight_shape)

    def set_extra_state(self, state: Tensor | dict) -> None:
        self.block_shape = self.check_record(state)

    def check_record(self, state: Tensor | dict, storage: bool = True) -> tuple[int, int]:
        """Raise ValueError unless a checkpoint's record fits this parameterization (kind, weight shape and,
        with ``storage``, the storage layout); returns its block shape. Old checkpoints hold a dict."""
        if isinstance(state, dict):
            got = {"kind": state.get("kind"), "layout": state.get("layout"),
                   "weight_shape": tuple(state.get("weight_shape") or ()), "block_shape": state.get("block_shape")}
        else:
            _, rec = records.decode(state, "Parameterization")
            got = {"kind": rec["kind"], "layout": rec["storage"], "weight_shape": rec["shape"],
                   "block_shape": (rec["block_n"], rec["block_k"])}
        mine = {"kind": self.kind, "weight_shape": self.weight_shape}
        if storage:
            mine["layout"] = self.layout
        for key, have in mine.items():
            if got[key] != have:
                raise ValueError(f"checkpoint has {key}={got[key]!r} but this parameterization has {key}={have!r}")
        return tuple(got["block_shape"])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        record = state_dict.get(prefix + "_extra_state")
        if record is not None:  # before anything changes: a checkpoint of another kind or shape loads nothing
            self.check_record(record)
        # The dense mask may be None (PILoT before pruning) here and set in the checkpoint, or the reverse.
        key = prefix + "mask"
        if self.layout == "dense":
            if key in state_dict and self.mask is None:
                self.mask = torch.empty_like(state_dict[key], device=self.w.device)
            elif key not in state_dict and self.mask is not None:
                self.mask = None
        else:
            # Compact storage: the checkpoint may hold another number of active coordinates. Resize in
            # place (``.data`` keeps the Parameter objects, so references held elsewhere stay valid).
            for name in ("m", "w"):
                p, src = getattr(self, name), state_dict.get(prefix + name)
                if p is not None and isinstance(src, Tensor) and src.shape != p.shape:
                    p.data = p.new_empty(src.shape)
            names = [f"index_{f}" for f in _INDEX_FIELDS] + (["pad_mask"] if self.layout == "bsr" else [])
            for name in names:
                buf, src = getattr(self, name), state_dict.get(prefix + name)
                if isinstance(src, Tensor) and src.shape != buf.shape:
                    setattr(self, name, buf.new_empty(src.shape))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


def is_sparse_layer(module: nn.Module) -> bool:
    """A training-time sparse layer: a module holding a Parameterization as ``.param`` (SparseLinear,
    SparseConv1d / 2d, or a user's own module built the same way)."""
    return isinstance(getattr(module, "param", None), Parameterization)


def sparse_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every training-time sparse layer of ``model``, in module order."""
    return [(name, m) for name, m in model.named_modules() if is_sparse_layer(m)]


def check_beta(beta) -> float:
    """``beta`` (the scale m² − w²) as a float: finite and >= 0."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta < 0:
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
    return float(beta)


def _check_mask_dtype(mask: Tensor) -> None:
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must have dtype torch.bool, got {mask.dtype} (convert with mask != 0)")
