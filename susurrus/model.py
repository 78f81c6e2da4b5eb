"""The Whisper network: an audio encoder and a text decoder with cached attention.

Parameter names follow the original checkpoints, so an OpenAI `.pt` state dict loads as is.
Decoding runs against a `KVCache` that is allocated once per decode: each step writes its
keys and values in place, and the cross-attention keys and values of the audio are computed
once per window rather than once per token.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class ModelDimensions:
    n_mels: int
    n_audio_ctx: int
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int
    n_vocab: int
    n_text_ctx: int
    n_text_state: int
    n_text_head: int
    n_text_layer: int


class LayerNorm(nn.LayerNorm):
    """LayerNorm in float32 whatever the model's dtype: half precision loses the variance."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # The common CPU case, spelled out: four no-op casts per call add up per token.
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return F.layer_norm(
            x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps
        ).type(x.dtype)


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> Tensor:
    """The encoder's fixed positional encoding: sines then cosines over geometric timescales."""
    assert channels % 2 == 0
    step = math.log(max_timescale) / (channels // 2 - 1)
    # Explicitly on the CPU: under a meta-device context arange would pull in torch._dynamo.
    half = torch.arange(channels // 2, dtype=torch.float32, device="cpu")
    inv_timescales = torch.exp(-step * half)
    angles = (
        torch.arange(length, dtype=torch.float32, device="cpu")[:, None] * inv_timescales[None, :]
    )
    return torch.cat([angles.sin(), angles.cos()], dim=1)


# Attention calls with at most this many queries per row are decoding steps (one token, or
# a few beams asking one audio), where step_kernel applies.
STEP_QUERIES = 8


class KVCache:
    """Preallocated keys and values of a decoder pass.

    Self-attention: one (batch, heads, n_ctx, head_dim) buffer per layer for keys and one for
    values, filled left to right. Cross-attention: the audio's keys and values per layer,
    computed once. (The engine keeps many windows' rows in one table: engine/step.py.)
    """

    def __init__(self, self_k: list[Tensor], self_v: list[Tensor]) -> None:
        self.self_k = self_k
        self.self_v = self_v
        self.cross_k: list[Tensor] = []
        self.cross_v: list[Tensor] = []
        self.length = 0  # positions filled so far


class MultiHeadAttention(nn.Module):
    def __init__(self, n_state: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)
        # Self-attention projects queries, keys and values in one fused product instead
        # of three where the loader asks (`fuse_qkv`, or int8: see quantize.py); None
        # keeps the three layers.
        self.qkv: nn.Module | None = None
        self.register_state_dict_post_hook(_split_fused_qkv)
        # Attention can run in a narrower type than the rest (bfloat16 with int8 weights on
        # the CPU): reading the audio's keys/values dominates a decoding step once the
        # weights are int8, and half-width keys halve it.
        self.attention_dtype: torch.dtype | None = None
        # The attention of decoding steps (a few queries per row) through a kernel of
        # kernels.py instead of SDPA on the CPU, (q, k, v, mask) -> out. None: SDPA. One
        # with a true `reads_half` attribute takes float16 keys and values beside float32
        # queries (computing in float32).
        self.step_kernel: Callable[..., Tensor] | None = None
        # The attention of many queries without a mask (the encoder's) through a kernel
        # measured faster than SDPA on the CPU (see kernels.py); None: SDPA.
        self.long_kernel: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None

    def sdpa(self, q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
        dtype = self.attention_dtype or q.dtype
        if q.dtype == k.dtype == v.dtype == dtype:
            return self._attention(q, k, v, **kwargs)
        if k.dtype == v.dtype == torch.float16 and q.dtype == torch.float32:
            # Keys and values stored in float16 for their memory alone (a float32 model's
            # audio keys under `auto` on the CPU): the arithmetic stays float32. A step
            # kernel that reads float16 itself (`reads_half`) takes them as they are.
            if self._steps(q, kwargs) and getattr(self.step_kernel, "reads_half", False):
                return self.step_kernel(q, k, v, kwargs.get("attn_mask"))
            return self._attention(q, k.float(), v.float(), **kwargs)
        # Only what differs is cast (a decoding step's audio keys are kept in `dtype`):
        # a cast to the same type is still an operator call, a few per layer and step.
        k = k if k.dtype == dtype else k.to(dtype)
        v = v if v.dtype == dtype else v.to(dtype)
        return self._attention(q.to(dtype), k, v, **kwargs).to(q.dtype)

    def _steps(self, q: Tensor, kwargs: dict) -> bool:
        """Whether this attention is a decoding step's (a few queries), for step_kernel."""
        return (self.step_kernel is not None and q.shape[-2] <= STEP_QUERIES
                and not kwargs.get("is_causal"))

    def _attention(self, q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
        kernel = self.step_kernel
        if not self._steps(q, kwargs):
            plain = not kwargs.get("is_causal") and kwargs.get("attn_mask") is None
            if self.long_kernel is not None and plain:
                return self.long_kernel(q, k, v)
            return F.scaled_dot_product_attention(q, k, v, **kwargs)
        return kernel(q, k, v, kwargs.get("attn_mask"))

    def fuse_qkv(self) -> None:
        """Stack the query, key and value layers into one (the key's missing bias as
        zeros): a decoding step reads three small weights in one call, whose fixed cost
        is much of a one-row product's time (base float32 on a Zen 4: steps 3-10% and
        the encoder 5-9% faster). Each output is the same sum; the state dict still has
        the three layers (checkpoints, export)."""
        if self.qkv is not None:
            return
        q, k, v = self.query, self.key, self.value
        fused = nn.Linear(q.in_features, 3 * q.out_features, device=q.weight.device,
                          dtype=q.weight.dtype)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
            fused.bias.copy_(torch.cat([q.bias, torch.zeros_like(q.bias), v.bias]))
        self.qkv = fused
        del self.query, self.key, self.value

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values of `x`, each (batch, length, n_state)."""
        if self.qkv is not None:
            return self.qkv(x).chunk(3, dim=-1)
        return self.query(x), self.key(x), self.value(x)

    def split_heads(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.n_head, -1).transpose(1, 2)

    def merge_heads(self, x: Tensor) -> Tensor:
        batch, _, length, _ = x.shape
        return x.transpose(1, 2).reshape(batch, length, -1)

    def forward(self, x: Tensor, causal: bool = False) -> Tensor:
        """Self-attention without a cache (the encoder, or a full decoder pass)."""
        q, k, v = (self.split_heads(y) for y in self.project_qkv(x))
        return self.out(self.merge_heads(self.sdpa(q, k, v, is_causal=causal)))

    def cross_kv(self, xa: Tensor) -> tuple[Tensor, Tensor]:
        """The audio's keys and values, (batch, heads, frames, head_dim), contiguous: each
        head's frames side by side is what the attention of a step reads fastest (half
        the time of the projection's own (frames, heads) order on a Zen 4)."""
        k, v = self.split_heads(self.key(xa)), self.split_heads(self.value(xa))
        dtype = self.attention_dtype or k.dtype
        return k.to(dtype).contiguous(), v.to(dtype).contiguous()

    def attend(self, x: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Cross-attention. `x` may hold several rows (beams, samples) per row of `k`/`v`:
        they become extra queries against one copy of the audio's keys, not copies of it.
        `x` (rows, n_state), without a length: a decoding step's one position per row
        (engine/step.py), answered in the same shape."""
        step = x.dim() == 2
        q = self.query(x)
        # One position: (rows, heads, 1, dim) is the same memory as split_heads' result.
        q = q.view(q.shape[0], self.n_head, 1, -1) if step else self.split_heads(q)
        batch, heads, length, dim = q.shape
        group = batch // k.shape[0]
        if group > 1:
            q = q.view(k.shape[0], group, heads, length, dim).transpose(1, 2)
            q = q.reshape(k.shape[0], heads, group * length, dim)
        out = self.sdpa(q, k, v)
        if group > 1:
            out = out.view(k.shape[0], heads, group, length, dim).transpose(1, 2)
            out = out.reshape(batch, heads, length, dim)
        return self.out(out.reshape(batch, -1) if step else self.merge_heads(out))

    def attention_logits(self, x: Tensor, k: Tensor) -> Tensor:
        """Scaled QK^T before the softmax, in float32: what SDPA computes but does not return.

        Word timestamps need the logits rather than the weights: they take the softmax over
        the frames of real audio only.
        """
        q = self.split_heads(self.query(x))
        return q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])

    def cached_self_attention(
        self, x: Tensor, cache_k: Tensor, cache_v: Tensor, offset: int
    ) -> Tensor:
        """Write this step's keys/values at `offset` and attend over everything so far."""
        length = x.shape[1]
        end = offset + length
        q, k, v = self.project_qkv(x)
        cache_k[:, :, offset:end] = self.split_heads(k)
        cache_v[:, :, offset:end] = self.split_heads(v)
        q = self.split_heads(q)
        k, v = cache_k[:, :, :end], cache_v[:, :, :end]
        if length == 1:
            out = self.sdpa(q, k, v)
        elif offset == 0:
            out = self.sdpa(q, k, v, is_causal=True)
        else:
            allowed = torch.ones(length, end, dtype=torch.bool, device=x.device).tril(offset)
            out = self.sdpa(q, k, v, attn_mask=allowed)
        return self.out(self.merge_heads(out))


def _split_fused_qkv(module: nn.Module, state: dict, prefix: str, metadata: object) -> None:
    """A fused float self-attention saves its three layers as the checkpoints have them."""
    weight = state.pop(prefix + "qkv.weight", None)
    if weight is None:
        return
    biases = state.pop(prefix + "qkv.bias").chunk(3)
    for name, part, bias in zip(("query", "key", "value"), weight.chunk(3), biases):
        state[f"{prefix}{name}.weight"] = part
        if name != "key":
            state[f"{prefix}{name}.bias"] = bias


class ResidualAttentionBlock(nn.Module):
    def __init__(self, n_state: int, n_head: int, cross_attention: bool = False) -> None:
        super().__init__()
        self.attn = MultiHeadAttention(n_state, n_head)
        self.attn_ln = LayerNorm(n_state)
        self.cross_attn = MultiHeadAttention(n_state, n_head) if cross_attention else None
        self.cross_attn_ln = LayerNorm(n_state) if cross_attention else None
        self.mlp = nn.Sequential(
            nn.Linear(n_state, 4 * n_state), nn.GELU(), nn.Linear(4 * n_state, n_state)
        )
        self.mlp_ln = LayerNorm(n_state)

    def forward(self, x: Tensor) -> Tensor:
        """Encoder block."""
        x = x + self.attn(self.layer_input(self.attn_ln(x)))
        return x + self.mlp(self.layer_input(self.mlp_ln(x)))

    def layer_input(self, h: Tensor) -> Tensor:
        """`h` in the type the block's layers take: the encoder may run them in bfloat16
        around a float32 residual stream (AudioEncoder.set_layer_dtype). The sums back into
        the stream promote to its type within the add."""
        fc = self.mlp[0]
        return h.to(fc.weight.dtype) if isinstance(fc, nn.Linear) else h


class AudioEncoder(nn.Module):
    def __init__(self, n_mels: int, n_ctx: int, n_state: int, n_head: int, n_layer: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, n_state, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(n_state, n_state, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoids(n_ctx, n_state))
        self.blocks = nn.ModuleList(ResidualAttentionBlock(n_state, n_head) for _ in range(n_layer))
        self.ln_post = LayerNorm(n_state)

    def set_layer_dtype(self, dtype: torch.dtype, rest: torch.dtype | None = None) -> None:
        """Run the convolutions and linear layers in `dtype` (bfloat16 on a CPU with
        AVX512-BF16 or AMX), while the residual stream, the LayerNorms and the positional
        embedding keep their type (or take `rest`): the blocks' sums keep float32's
        precision at little cost, since the products are most of the time. Each tensor is
        converted once, from the type it was loaded in: through a float32 copy, base's
        layers would add 80 MB to the load's peak for the same values."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d)):
                module.to(dtype)
            elif rest is not None:
                module._apply(  # this module's own tensors; its children are visited too
                    lambda t: t.to(rest) if t.is_floating_point() else t, recurse=False
                )

    def forward(self, mel: Tensor) -> Tensor:
        """(batch, n_mels, 3000) log-mel -> (batch, 1500, n_state) audio features, in the
        type of the encoder's residual stream (which may differ from the decoder's: see
        quantize.py)."""
        x = F.gelu(self.conv1(mel.to(self.conv1.weight.dtype)))
        # Contiguous (time, channel) rows: left transposed, every residual add and LayerNorm
        # of every block would walk memory across the grain.
        x = F.gelu(self.conv2(x)).transpose(1, 2).contiguous()
        if x.shape[1] != self.positional_embedding.shape[0]:
            raise ValueError(
                f"the encoder takes {2 * self.positional_embedding.shape[0]} mel frames "
                f"(30 s), got {mel.shape[-1]}"
            )
        # The residual stream runs in the positional embedding's type (see set_layer_dtype).
        x = x.to(self.positional_embedding.dtype) + self.positional_embedding
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x)


class TextDecoder(nn.Module):
    def __init__(self, n_vocab: int, n_ctx: int, n_state: int, n_head: int, n_layer: int) -> None:
        super().__init__()
        weight = torch.empty(n_vocab, n_state)
        if not weight.is_meta:
            nn.init.normal_(weight)  # nn.Embedding's own initialisation
        # Built on the meta device (the loaders do), normal_ has no kernel and goes through
        # torch's Python reference code, whose first use costs about a second of start-up.
        self.token_embedding = nn.Embedding(n_vocab, n_state, _weight=weight)
        self.positional_embedding = nn.Parameter(torch.empty(n_ctx, n_state))
        self.blocks = nn.ModuleList(
            ResidualAttentionBlock(n_state, n_head, cross_attention=True) for _ in range(n_layer)
        )
        self.ln = LayerNorm(n_state)
        # The output projection's product, (hidden, weight) -> logits; a kernel chosen by
        # measurement on the CPU can take the place of the plain matmul (see kernels.py).
        self.project: Callable[[Tensor, Tensor], Tensor] | None = None
        # Where measured faster: an int8 screen of the projection for greedy float32 steps
        # that keeps their tokens exact (see screen.py; set by kernels.tune).
        self.screen: Any = None

    def new_cache(self, batch_size: int, n_ctx: int | None = None) -> KVCache:
        n_ctx = n_ctx or self.positional_embedding.shape[0]
        n_state = self.positional_embedding.shape[1]
        n_head = self.blocks[0].attn.n_head
        weight = self.positional_embedding
        shape = (batch_size, n_head, n_ctx, n_state // n_head)
        # Kept in the attention's type, so that no step converts the whole cache.
        dtype = self.blocks[0].attn.attention_dtype or weight.dtype

        def zeros() -> list[Tensor]:
            return [weight.new_zeros(shape, dtype=dtype) for _ in self.blocks]

        return KVCache(zeros(), zeros())

    def set_cache_dtype(self, dtype: torch.dtype | None) -> None:
        """Keep the keys and values of every attention (its own, the audio's) in `dtype`
        (None: the model's type). float16 beside a float32 model stores them narrow for
        their memory; the attention still computes in float32 (MultiHeadAttention.sdpa)."""
        for block in self.blocks:
            block.attn.attention_dtype = block.cross_attn.attention_dtype = dtype

    def fill_cross_cache(self, cache: KVCache, audio_features: Tensor) -> None:
        """Project the audio once per window into every layer's cross-attention keys/values.

        A cache that already holds buffers of the right shape (a CUDA graph's) is written in
        place, so that the graph sees the new audio.
        """
        in_place = len(cache.cross_k) == len(self.blocks)
        keys: list[Tensor] = []
        values: list[Tensor] = []
        # Layer by layer: one layer's projection at a time beside the cache, not all.
        for i, block in enumerate(self.blocks):
            k, v = block.cross_attn.cross_kv(audio_features)
            if in_place and cache.cross_k[i].shape == k.shape and cache.cross_k[i].dtype == k.dtype:
                cache.cross_k[i].copy_(k)
                cache.cross_v[i].copy_(v)
                k, v = cache.cross_k[i], cache.cross_v[i]
            keys.append(k)
            values.append(v)
        cache.cross_k, cache.cross_v = keys, values

    def forward(
        self, tokens: Tensor, cache: KVCache, cross_queries: dict[int, Tensor | None] | None = None
    ) -> Tensor:
        """Hidden states (batch, new_tokens, n_state) of `tokens`, which continue the cache.
        `cross_queries`: for each layer it has a key of, the input of that layer's
        cross-attention is stored under it (the alignment heads' queries are made from it)."""
        offset = cache.length
        length = tokens.shape[1]
        if offset + length > self.positional_embedding.shape[0]:
            raise ValueError(f"decoder context of {self.positional_embedding.shape[0]} exceeded")
        positions = self.positional_embedding[offset : offset + length]
        x = self.token_embedding(tokens).to(positions.dtype) + positions
        for i, block in enumerate(self.blocks):
            x = x + block.attn.cached_self_attention(
                block.attn_ln(x), cache.self_k[i], cache.self_v[i], offset
            )
            normed = block.cross_attn_ln(x)
            if cross_queries is not None and i in cross_queries:
                cross_queries[i] = normed
            x = x + block.cross_attn.attend(normed, cache.cross_k[i], cache.cross_v[i])
            x = x + block.mlp(block.mlp_ln(x))
        cache.length = offset + length
        return self.ln(x)

    def logits(self, hidden: Tensor) -> Tensor:
        """Output projection tied to the token embedding, in float32."""
        if hasattr(self.token_embedding, "logits"):  # int8 (see quantize.py)
            return self.token_embedding.logits(hidden).float()
        weight = self.token_embedding.weight
        if self.project is not None:
            return self.project(hidden, weight).float()
        return (hidden @ weight.to(hidden.dtype).T).float()


class Whisper(nn.Module):
    def __init__(self, dims: ModelDimensions) -> None:
        super().__init__()
        self.dims = dims
        self.encoder = AudioEncoder(
            dims.n_mels, dims.n_audio_ctx, dims.n_audio_state, dims.n_audio_head, dims.n_audio_layer
        )
        self.decoder = TextDecoder(
            dims.n_vocab, dims.n_text_ctx, dims.n_text_state, dims.n_text_head, dims.n_text_layer
        )
        # Cross-attention heads that follow the audio closely; used for word timestamps.
        self.register_buffer("alignment_heads", self.default_alignment_heads(), persistent=False)
        self.name: str | None = None  # registry name or path it was loaded from
        # Engines replay decoding steps as CUDA graphs on a GPU (see graphs.py); False for
        # eager steps.
        self.cuda_graphs = True

    def default_alignment_heads(self) -> Tensor:
        """All heads of the last half of the decoder layers, for checkpoints without a list."""
        heads = torch.zeros(self.dims.n_text_layer, self.dims.n_text_head, dtype=torch.bool)
        heads[self.dims.n_text_layer // 2 :] = True
        return heads

    def set_alignment_heads(self, heads) -> None:
        """Set from a bool (n_layer, n_head) mask or a list of [layer, head] pairs."""
        mask = torch.zeros(self.dims.n_text_layer, self.dims.n_text_head, dtype=torch.bool)
        heads = torch.as_tensor(heads)
        if heads.dtype == torch.bool:
            mask[:] = heads.reshape(mask.shape)
        else:
            for layer, head in heads.reshape(-1, 2).tolist():
                mask[layer, head] = True
        self.register_buffer("alignment_heads", mask, persistent=False)

    def set_attention_dtype(self, dtype: torch.dtype | None) -> None:
        """Run every attention in `dtype` (None: the model's own float type)."""
        for module in self.modules():
            if isinstance(module, MultiHeadAttention):
                module.attention_dtype = dtype

    def fuse_self_attention(self) -> None:
        """One product for each self-attention's queries, keys and values (see
        `MultiHeadAttention.fuse_qkv`)."""
        for block in (*self.encoder.blocks, *self.decoder.blocks):
            block.attn.fuse_qkv()

    @property
    def device(self) -> torch.device:
        return self.decoder.positional_embedding.device

    @property
    def dtype(self) -> torch.dtype:
        """The float type activations run in (int8 models keep float32 or float16 here)."""
        return self.decoder.positional_embedding.dtype

    @property
    def is_multilingual(self) -> bool:
        return self.dims.n_vocab >= 51865

    @property
    def num_languages(self) -> int:
        return self.dims.n_vocab - 51765 - int(self.is_multilingual)

    def embed_audio(self, mel: Tensor) -> Tensor:
        return self.encoder(mel).to(self.dtype)

    def logits(self, tokens: Tensor, audio_features: Tensor) -> Tensor:
        """Logits of every position of `tokens` (batch, length) given encoded audio."""
        cache = self.decoder.new_cache(tokens.shape[0], n_ctx=tokens.shape[1])
        self.decoder.fill_cross_cache(cache, audio_features)
        return self.decoder.logits(self.decoder(tokens, cache))

    def forward(self, mel: Tensor, tokens: Tensor) -> Tensor:
        return self.logits(tokens, self.embed_audio(mel))

    def alignment_logits(self, tokens: Tensor, audio_features: Tensor) -> tuple[Tensor, Tensor]:
        """One decoder pass over `tokens` that also returns the alignment heads' attention.

        Returns the logits (batch, length, n_vocab) and the cross-attention logits before the
        softmax (batch, n_alignment_heads, length, n_audio_ctx), heads in (layer, head) order.
        """
        heads = self.alignment_heads.nonzero().tolist()
        if not heads:
            raise ValueError("this model has no alignment heads set")
        layers = sorted({layer for layer, _ in heads})
        cache = self.decoder.new_cache(tokens.shape[0], n_ctx=tokens.shape[1])
        self.decoder.fill_cross_cache(cache, audio_features)
        # The queries are made from the cross-attention LayerNorm's output, which the pass
        # hands back. (Not forward hooks: they are the modules', and fired in the passes of
        # every thread using the model, which overwrote each other's.)
        normed: dict[int, Tensor | None] = dict.fromkeys(layers)
        logits = self.decoder.logits(self.decoder(tokens, cache, cross_queries=normed))
        per_layer = {
            i: self.decoder.blocks[i].cross_attn.attention_logits(normed[i], cache.cross_k[i])
            for i in layers
        }
        qk = torch.stack([per_layer[layer][:, head] for layer, head in heads], dim=1)
        return logits, qk

    # Decoding entry points live in their own modules; these keep the reference API.
    def detect_language(self, mel: Tensor, tokenizer=None):
        from .decoding import detect_language

        return detect_language(self, mel, tokenizer)

    def decode(self, mel: Tensor, options=None, **kwargs):
        from .decoding import decode

        return decode(self, mel, options, **kwargs)

    def transcribe(self, audio, **kwargs):
        from .transcribe import transcribe

        return transcribe(self, audio, **kwargs)
