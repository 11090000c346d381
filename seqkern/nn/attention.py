"""Attention modules: ``MultiheadAttention`` (drop-in for torch's) and ``CausalSelfAttention``
(grouped-query, optional sliding window, KV cache for generation)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from seqkern.ops import _autocast
from seqkern.ops import attention as ops
from seqkern.reference import attention as ref

__all__ = ["MultiheadAttention", "CausalSelfAttention", "KVCache"]


def _merge_masks(attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], N: int, H: int,
                 L: int, S: int, dtype: torch.dtype) -> Optional[Tensor]:
    """torch.nn.MultiheadAttention's masks (bool True = *not* allowed, or additive; attn_mask
    (L, S) or (N·H, L, S), key_padding_mask (N, S)) as one SDPA mask (bool True = allowed, or
    additive) broadcastable to (N, H, L, S)."""
    masks = []
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            if tuple(attn_mask.shape) != (L, S):
                raise ValueError(f"attn_mask must be ({L}, {S}) or ({N * H}, {L}, {S}), got "
                                 f"{tuple(attn_mask.shape)}")
            masks.append(attn_mask.view(1, 1, L, S))
        elif attn_mask.dim() == 3:
            if tuple(attn_mask.shape) != (N * H, L, S):
                raise ValueError(f"attn_mask must be ({L}, {S}) or ({N * H}, {L}, {S}), got "
                                 f"{tuple(attn_mask.shape)}")
            masks.append(attn_mask.view(N, H, L, S))
        else:
            raise ValueError(f"attn_mask must be 2-D or 3-D, got shape {tuple(attn_mask.shape)}")
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (N, S):
            raise ValueError(f"key_padding_mask must be ({N}, {S}), got "
                             f"{tuple(key_padding_mask.shape)}")
        masks.append(key_padding_mask.view(N, 1, 1, S))
    if not masks:
        return None
    for m in masks:
        if m.dtype != torch.bool and not m.is_floating_point():
            raise TypeError(f"attention masks must be bool or floating point, got {m.dtype}")
    if all(m.dtype == torch.bool for m in masks):
        allowed = ~masks[0]
        for m in masks[1:]:
            allowed = allowed & ~m
        return allowed
    out = None
    for m in masks:
        add = (torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
               if m.dtype == torch.bool else m.to(dtype))
        out = add if out is None else out + add
    return out


class MultiheadAttention(nn.Module):
    """Drop-in for ``torch.nn.MultiheadAttention``: same constructor, parameter names and
    forward signature, so ``load_state_dict`` works in both directions.

    The attention itself runs on seqkern's kernels, dropout included, when no weights are
    requested. With ``need_weights=True`` (torch's default) it falls back to the reference path,
    which materialises the (L, S) weights as torch's module does (at about torch's speed:
    0.78–1.28× of it). Differences from torch: a query that
    every mask rules out gives zeros, not NaN; ``is_causal=True`` without ``attn_mask`` is
    accepted and means a causal mask; the kernels' backward is not differentiable again, so a
    double backward (``create_graph=True``, e.g. a gradient penalty) raises a clear error on
    the kernel path, where torch's supports it (``seqkern.use_backend("reference")`` does).
    """

    __constants__ = ["batch_first"]

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False,
                 kdim: Optional[int] = None, vdim: Optional[int] = None,
                 batch_first: bool = False, device=None, dtype=None) -> None:
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(f"embed_dim and num_heads must be > 0, got {embed_dim} and {num_heads}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        fk = {"device": device, "dtype": dtype}
        super().__init__()
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        if not self._qkv_same_embed_dim:
            self.q_proj_weight = nn.Parameter(torch.empty((embed_dim, embed_dim), **fk))
            self.k_proj_weight = nn.Parameter(torch.empty((embed_dim, self.kdim), **fk))
            self.v_proj_weight = nn.Parameter(torch.empty((embed_dim, self.vdim), **fk))
            self.register_parameter("in_proj_weight", None)
        else:
            self.in_proj_weight = nn.Parameter(torch.empty((3 * embed_dim, embed_dim), **fk))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **fk))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = NonDynamicallyQuantizableLinear(embed_dim, embed_dim, bias=bias, **fk)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty((1, 1, embed_dim), **fk))
            self.bias_v = nn.Parameter(torch.empty((1, 1, embed_dim), **fk))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            nn.init.xavier_uniform_(self.q_proj_weight)
            nn.init.xavier_uniform_(self.k_proj_weight)
            nn.init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
        if self.bias_v is not None:
            nn.init.xavier_normal_(self.bias_v)

    def merge_masks(self, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
                    query: Tensor) -> tuple[Optional[Tensor], Optional[int]]:
        """torch.nn.MultiheadAttention.merge_masks: (mask, type) with type 1 for a lone
        key_padding_mask (B, L), 2 once an attn_mask ((L, L) or (B·heads, L, L)) is given, both
        then expanded to (B, heads, L, L) and added; (None, None) without masks. query is
        (B, L, E)."""
        if attn_mask is None:
            return (key_padding_mask, 1) if key_padding_mask is not None else (None, None)
        B, L, _ = query.shape
        if attn_mask.dim() == 3:
            merged = attn_mask.view(B, -1, L, L)
        else:
            merged = attn_mask.view(1, 1, L, L).expand(B, self.num_heads, -1, -1)
        if key_padding_mask is not None:
            merged = merged + key_padding_mask.view(B, 1, 1, L).expand(-1, self.num_heads, -1, -1)
        return merged, 2

    def _project(self, query: Tensor, key: Tensor, value: Tensor):
        E = self.embed_dim
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else (b[:E], b[E:2 * E], b[2 * E:])
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight
            wq, wk, wv = w[:E], w[E:2 * E], w[2 * E:]
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        if query is key and key is value and self._qkv_same_embed_dim:
            # self-attention: one packed projection; q, k, v are strided slices of it
            qkv = nn.functional.linear(query, self.in_proj_weight, b)
            return qkv[..., :E], qkv[..., E:2 * E], qkv[..., 2 * E:]
        return (nn.functional.linear(query, wq, bq), nn.functional.linear(key, wk, bk),
                nn.functional.linear(value, wv, bv))

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        unbatched = query.dim() == 2
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"query, key, value must all be 2-D (unbatched) or 3-D, got "
                             f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
        if query.shape[-1] != self.embed_dim:
            raise ValueError(f"query's last dim must be embed_dim={self.embed_dim}, got "
                             f"{query.shape[-1]}")
        if key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            raise ValueError(f"key/value last dims must be kdim={self.kdim}, vdim={self.vdim}, "
                             f"got {key.shape[-1]}, {value.shape[-1]}")
        same = query is key and key is value
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                if key_padding_mask.dim() != 1:
                    raise ValueError(f"key_padding_mask must be ({key.shape[1]},) for unbatched "
                                     f"input, got {tuple(key_padding_mask.shape)}")
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        if same:
            key = value = query
        N, L, _ = query.shape
        H, hd = self.num_heads, self.head_dim
        if key.shape[0] != N or value.shape[0] != N or key.shape[1] != value.shape[1]:
            raise ValueError(f"query, key and value must have the same batch size and key/value the "
                             f"same length; got query {tuple(query.shape)}, key {tuple(key.shape)}, "
                             f"value {tuple(value.shape)} (batch_first={self.batch_first})")

        q, k, v = self._project(query, key, value)  # (N, L|S, E)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(N, 1, -1).to(k.dtype)], dim=1)
            v = torch.cat([v, self.bias_v.expand(N, 1, -1).to(v.dtype)], dim=1)
            attn_mask = _pad_last(attn_mask)
            key_padding_mask = _pad_last(key_padding_mask)
        q = q.view(N, L, H, hd).transpose(1, 2)
        k = k.view(N, k.shape[1], H, hd).transpose(1, 2)
        v = v.view(N, v.shape[1], H, hd).transpose(1, 2)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(N, H, 1, hd)], dim=2)
            v = torch.cat([v, v.new_zeros(N, H, 1, hd)], dim=2)
            attn_mask = _pad_last(attn_mask)
            key_padding_mask = _pad_last(key_padding_mask)
        S = k.shape[2]
        if is_causal and attn_mask is not None:
            # torch's rule: with attn_mask, is_causal only hints that the mask is causal, and one
            # of the two is applied: the hint alone when neither weights nor key padding need
            # the mask, else the mask alone (they differ once bias_k or a zero key is appended)
            if key_padding_mask is None and not need_weights:
                attn_mask = None
            else:
                is_causal = False
        mask = _merge_masks(attn_mask, key_padding_mask, N, H, L, S, q.dtype)

        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:  # the weights must be materialised: the reference path
            p = ref.attention_weights(q, k, mask, is_causal)
            if dropout > 0:
                p = nn.functional.dropout(p, dropout, training=True)
            out = p @ v
            if need_weights:
                weights = p.mean(dim=1) if average_attn_weights else p
                if unbatched:
                    weights = weights.squeeze(0)
        else:
            out = ops.scaled_dot_product_attention(q, k, v, mask, dropout_p=dropout,
                                                   is_causal=is_causal)
        out = self.out_proj(out.transpose(1, 2).reshape(N, L, self.embed_dim))
        if unbatched:
            return out.squeeze(0), weights
        return (out if self.batch_first else out.transpose(0, 1)), weights


def _pad_last(mask: Optional[Tensor]) -> Optional[Tensor]:
    """One more key (bias_k / zero attention) that every query may see."""
    if mask is None:
        return None
    return nn.functional.pad(mask, (0, 1), value=False if mask.dtype == torch.bool else 0.0)


def _check_window(window) -> None:
    # (here, not only in attention: a bad window found there would come after the cache grew)
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)):
        raise TypeError(f"window must be an int or None, got {type(window).__name__}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, got {window}")


class KVCache:
    """Keys and values seen so far, (B, Hkv, ·, D) each, in buffers that grow geometrically
    (capacity doubles), so appending one token copies O(1) amortised, not the whole history.

    With a sliding ``window`` (``CausalSelfAttention.new_cache`` passes the module's), no query
    can see a key more than ``window − 1`` positions back, so when the buffer is full the
    older keys are dropped (the last ``window − 1`` move to its front) instead of growing it:
    memory stays bounded by about twice the window plus the longest chunk, as a rolling buffer.
    ``length`` counts every token appended; ``dropped`` those no longer held.

    Appending writes into the buffers in place. When autograd records (grad enabled and the
    new keys or the cache require grad, e.g. a training-mode prefill then ``step``), it
    concatenates instead, so attention calls that saved earlier contents for backward keep
    them: O(length) per append, correct gradients, nothing dropped. Buffers made under
    ``torch.inference_mode`` are copied once into plain tensors when appended to outside it.

    The dtype and device are those given, else the first keys'. An empty cache follows the keys
    it gets (a module moved to float64 after ``new_cache``); a filled one refuses other dtypes.
    """

    def __init__(self, batch_size: int, num_kv_heads: int, head_dim: int, capacity: int = 0,
                 device=None, dtype=None, window: Optional[int] = None) -> None:
        _check_window(window)
        self.shape = (batch_size, num_kv_heads, head_dim)
        self.window = window
        self.length = 0
        self.dropped = 0
        self._device, self._dtype = device, dtype
        self._dtype_from_autocast = False  # (see append)
        self._hold(None, None)
        if capacity > 0:
            self._reserve(capacity)

    @property
    def capacity(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def _reserve(self, n: int) -> None:
        B, Hkv, D = self.shape
        held = self.length - self.dropped
        k = torch.empty(B, Hkv, n, D, device=self._device, dtype=self._dtype)
        v = torch.empty(B, Hkv, n, D, device=self._device, dtype=self._dtype)
        if held:
            k[:, :, :held] = self.k[:, :, :held]
            v[:, :, :held] = self.v[:, :, :held]
        self._hold(k, v)

    def _hold(self, k: Optional[Tensor], v: Optional[Tensor]) -> None:
        self.k, self.v = k, v
        # Whether the buffers are inference tensors, as far as eager code made them: compiled
        # code cannot ask (neither is_inference nor is_inference_mode_enabled traces), and its
        # own buffers count as not (README: a compiled step that grows the cache under
        # inference_mode makes inference tensors that a compiled step outside it cannot extend).
        self._inference_buffers = (k is not None and not torch.compiler.is_compiling()
                                   and k.is_inference())

    def __setstate__(self, state: dict) -> None:
        # (caches pickled by earlier versions lack the newer attributes)
        self.__dict__.update(state)
        self.__dict__.setdefault("_dtype_from_autocast", False)
        self._hold(self.k, self.v)  # (unpickled under inference_mode, they are inference tensors)

    def _fresh_buffers_needed(self) -> bool:
        """Whether appending must first copy the buffers: those of a recorded append may be
        saved for a backward, and inference tensors cannot be written outside inference mode."""
        if self.k is None:
            return False
        if self.k.requires_grad or self.v.requires_grad:
            return True
        if torch.compiler.is_compiling():  # (inside inference mode too: one needless copy)
            return self._inference_buffers
        return self.k.is_inference() and not torch.is_inference_mode_enabled()

    def _drop_outside_window(self) -> None:
        """Moves the last window − 1 held keys to the front of the buffers, dropping the rest."""
        held, keep = self.length - self.dropped, self.window - 1
        if held <= keep:
            return
        if keep:
            self.k[:, :, :keep] = self.k[:, :, held - keep:held].clone()
            self.v[:, :, :keep] = self.v[:, :, held - keep:held].clone()
        self.dropped += held - keep

    def append(self, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
        """Appends (B, Hkv, Lc, D) keys/values; returns views of everything held (the newest
        last; with a window, at least the window − 1 keys before the new ones)."""
        B, Hkv, D = self.shape
        if tuple(k_new.shape[:2]) != (B, Hkv) or k_new.shape[3] != D or k_new.shape != v_new.shape:
            raise ValueError(f"cache holds (B={B}, Hkv={Hkv}, ·, D={D}); got keys "
                             f"{tuple(k_new.shape)} and values {tuple(v_new.shape)}")
        if self.length == 0 and (self._dtype, self._device) != (k_new.dtype, k_new.device):
            self._dtype, self._device = k_new.dtype, k_new.device
            self._hold(None, None)
            self._dtype_from_autocast = _autocast.autocast_dtype(k_new.device) is not None
        elif (k_new.device == self._device and k_new.dtype != self._dtype
              and _autocast.autocast_dtype(k_new.device) is not None):
            # filled outside autocast, extended inside: attention casts them alike anyway
            k_new, v_new = k_new.to(self._dtype), v_new.to(self._dtype)
        elif (k_new.device == self._device and k_new.dtype != self._dtype
              and self._dtype_from_autocast):
            # filled inside autocast (which set the dtype), extended outside it: the held keys
            # follow the new ones' dtype, once (the attention needs q, k, v alike)
            held = self.length - self.dropped
            self._hold(self.k[:, :, :held].to(k_new.dtype), self.v[:, :, :held].to(k_new.dtype))
            self._dtype, self._dtype_from_autocast = k_new.dtype, False
        elif (k_new.dtype, k_new.device) != (self._dtype, self._device):
            raise TypeError(f"the cache holds {self._dtype} on {self._device} but got keys of "
                            f"{k_new.dtype} on {k_new.device}: start a new cache (new_cache) "
                            "after changing the module's dtype or device")
        held = self.length - self.dropped
        if torch.is_grad_enabled() and (k_new.requires_grad or v_new.requires_grad or (
                self.k is not None and (self.k.requires_grad or self.v.requires_grad))):
            # out of place: an earlier attention call may have saved the old contents
            if held == 0:
                self._hold(k_new, v_new)
            else:
                self._hold(torch.cat([self.k[:, :, :held], k_new], dim=2),
                           torch.cat([self.v[:, :, :held], v_new], dim=2))
            self.length += k_new.shape[2]
            return self.k, self.v
        if self._fresh_buffers_needed():
            self._reserve(self.capacity)
        Lc = k_new.shape[2]
        if held + Lc > self.capacity and self.window is not None:
            self._drop_outside_window()
            held = self.length - self.dropped
        if held + Lc > self.capacity or self.k is None:  # (no buffer yet even when Lc = 0)
            self._reserve(max(held + Lc, 2 * self.capacity, 16))
        self.k[:, :, held:held + Lc] = k_new
        self.v[:, :, held:held + Lc] = v_new
        self.length += Lc
        return self.k[:, :, :held + Lc], self.v[:, :, :held + Lc]


class CausalSelfAttention(nn.Module):
    """Causal self-attention with ``num_kv_heads`` key/value heads shared by ``num_heads``
    query heads (grouped-query attention; 1 = multi-query) and an optional sliding ``window``.

    Input (B, L, embed_dim). Generation: ``cache = m.new_cache(B)``, then ``m(x_chunk, cache)``
    for a prompt (any chunk sizes) and ``m.step(x_t, cache)`` per token; the result equals
    ``m(x_full)`` on the concatenated sequence (SPEC, streaming form).
    """

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: Optional[int] = None,
                 window: Optional[int] = None, bias: bool = True, device=None,
                 dtype=None) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if embed_dim <= 0 or num_heads <= 0 or num_kv_heads <= 0:
            raise ValueError("embed_dim, num_heads and num_kv_heads must be > 0")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads "
                             f"({num_kv_heads})")
        _check_window(window)
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.window = window
        fk = {"device": device, "dtype": dtype}
        self.qkv_proj = nn.Linear(embed_dim, (num_heads + 2 * num_kv_heads) * self.head_dim,
                                  bias=bias, **fk)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **fk)

    def new_cache(self, batch_size: int, capacity: int = 0) -> KVCache:
        """An empty cache for ``batch_size`` sequences; with this module's window, it holds
        only the keys a window can still reach (see KVCache)."""
        p = self.qkv_proj.weight
        return KVCache(batch_size, self.num_kv_heads, self.head_dim, capacity, p.device, p.dtype,
                       window=self.window)

    def forward(self, x: Tensor, cache: Optional[KVCache] = None) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be (B, L, {self.embed_dim}), got {tuple(x.shape)}")
        B, L, _ = x.shape
        H, Hkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x).view(B, L, H + 2 * Hkv, hd).transpose(1, 2)
        q, k, v = qkv[:, :H], qkv[:, H:H + Hkv], qkv[:, H + Hkv:]
        if cache is None:
            out = ops.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True,
                                                   window=self.window)
        else:
            if not isinstance(cache, KVCache):
                raise TypeError(f"cache must be a KVCache (from new_cache), got {type(cache).__name__}")
            if cache.window is not None and (self.window is None or self.window > cache.window):
                if cache.dropped:
                    raise RuntimeError(f"this cache dropped keys older than its window "
                                       f"({cache.window}), which window={self.window} would "
                                       "need: start a new cache (new_cache) after changing "
                                       "the window")
                cache.window = self.window  # nothing dropped yet: it keeps what this one needs
            k, v = cache.append(k, v)
            out = ops.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True,
                                                   window=self.window,
                                                   causal_alignment="bottom_right")
        return self.out_proj(out.transpose(1, 2).reshape(B, L, self.embed_dim))

    def step(self, x_t: Tensor, cache: KVCache) -> Tensor:
        """One token (B, embed_dim) -> (B, embed_dim), appending to ``cache``."""
        if not isinstance(cache, KVCache):  # (forward(x, None) is attention over x alone)
            raise TypeError(f"step needs a KVCache (from new_cache), got {type(cache).__name__}")
        if x_t.dim() != 2:
            raise ValueError(f"x_t must be (B, {self.embed_dim}), got {tuple(x_t.shape)}")
        return self.forward(x_t.unsqueeze(1), cache).squeeze(1)
