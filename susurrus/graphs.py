"""One decoding step with static shapes, replayed as a CUDA graph.

On a GPU, decoding one token of a large model launches hundreds of small kernels, and at
batch 1 the launches, not the arithmetic, set the pace. A step whose tensors never change
shape can be captured once as a CUDA graph and replayed for every later token: the step
reads the position from a device tensor, writes its keys and values at that position with
`index_copy_`, and attends over the whole preallocated cache with a mask instead of a slice
of growing length.

`StaticStep` runs the same function eagerly on any device (that is what the CPU tests
check against the ordinary decoder) and captures it on CUDA.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .model import KVCache, TextDecoder


def static_step(
    decoder: TextDecoder, tokens: Tensor, position: Tensor, pad: Tensor, cache: KVCache
) -> Tensor:
    """Logits (batch, n_vocab) of one new token per row at `position` (a 1-element tensor),
    in rows left-padded by `pad` positions (see KVCache)."""
    n_ctx = cache.self_k[0].shape[2]
    x = decoder.token_embedding(tokens).to(decoder.positional_embedding.dtype)
    x = x + decoder.positional_embedding[(position - pad).clamp(min=0)][:, None]
    # Attend to the row's positions up to this one: later slots hold stale or zero entries,
    # earlier ones may be padding.
    keys = torch.arange(n_ctx, device=tokens.device)
    visible = (keys <= position) & (keys >= pad[:, None])
    visible = visible[:, None, None, :]
    for i, block in enumerate(decoder.blocks):
        attn = block.attn
        h = block.attn_ln(x)
        q, k, v = (attn.split_heads(y) for y in attn.project_qkv(h))
        cache.self_k[i].index_copy_(2, position, k.to(cache.self_k[i].dtype))
        cache.self_v[i].index_copy_(2, position, v.to(cache.self_v[i].dtype))
        out = attn.sdpa(q, cache.self_k[i], cache.self_v[i], attn_mask=visible)
        x = x + attn.out(attn.merge_heads(out))
        x = x + block.cross_attn.attend(block.cross_attn_ln(x), cache.cross_k[i], cache.cross_v[i])
        x = x + block.mlp(block.mlp_ln(x))
    return decoder.logits(decoder.ln(x)[:, -1])


class StaticStep:
    """Decoding steps of one token per row for one cache, captured as a CUDA graph on a GPU.

    The cache's buffers must stay the same tensors for the runner's life (in-place beam
    reordering keeps them so); `cache.length` advances by one per call.
    """

    def __init__(self, decoder: TextDecoder, batch: int, n_audio: int, n_audio_ctx: int) -> None:
        self.decoder = decoder
        self.key = (batch, n_audio)
        # The whole context, whatever the prompt's length: one graph serves every window.
        self.cache = cache = decoder.new_cache(batch)
        attn = decoder.blocks[0].cross_attn
        dtype = attn.attention_dtype or decoder.positional_embedding.dtype
        _, n_head, _, head_dim = cache.self_k[0].shape
        shape = (n_audio, n_head, n_audio_ctx, head_dim)
        like = cache.self_k[0]
        cache.cross_k = [like.new_zeros(shape, dtype=dtype) for _ in decoder.blocks]
        cache.cross_v = [like.new_zeros(shape, dtype=dtype) for _ in decoder.blocks]
        device = like.device
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.pad = torch.zeros(batch, dtype=torch.long, device=device)  # set per decode
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None
        if device.type == "cuda":
            self._capture()

    def _capture(self) -> None:
        # Warm up on a side stream (lazy initialisation must not be captured), then capture.
        # The warm-up writes position 0 of the cache: the caller fills the cache afterwards.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                static_step(self.decoder, self.tokens, self.position, self.pad, self.cache)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = static_step(
                self.decoder, self.tokens, self.position, self.pad, self.cache
            )

    def __call__(self, tokens: Tensor) -> Tensor:
        position = self.cache.length
        if self.graph is None:
            self.position.fill_(position)
            logits = static_step(self.decoder, tokens, self.position, self.pad, self.cache)
        else:
            self.tokens.copy_(tokens)
            self.position.fill_(position)
            self.graph.replay()
            logits = self.logits.clone()
        self.cache.length = position + 1
        return logits
