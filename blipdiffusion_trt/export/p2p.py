"""The ``unet_p2p`` graph: the UNet with prompt-to-prompt attention control built in.

Editing (LAVIS ``blip_diffusion.py`` / ``ptp_utils.py``, "refine" control) runs one UNet call per
step on the rows ``[uncond_src, uncond_tgt, cond_src, cond_tgt]`` and changes the attention of the
target row ``cond_tgt`` from the source row ``cond_src``. Here that control is part of the graph
and driven by three small inputs of fixed shape, so switching it on and off from one step to the
next changes inputs, never the graph, and no attention map travels through the host:

``cross_weights`` [T]
    w_j = alpha(step, j) * beta_j per text token j of the target (T = text positions): 0 keeps the
    target's own cross-attention at token j, 1 takes the aligned source token's.
``token_map`` [T, T]
    M[j, i] = 1 where target token j is aligned with source token i (Needleman-Wunsch on token
    ids, LAVIS ``get_refinement_mapper``), one 1 per row.
``self_gate`` [1]
    1: the target takes the source's self-attention map in the small layers this step; 0: not.

Control acts on the LAST TWO ROWS of the batch (source, then target); rows before them (the
unconditional ones) run unchanged. So the batch is 4 rows for a generated image with guidance, 3
for a real image (its source reconstructs without guidance: no ``uncond_src``), 2 without guidance.

Layers and what they compute (A = softmax(Q K^T / sqrt(d)), per head; s = source, t = target):

- Cross-attention, every layer: LAVIS replaces the target's probabilities by
  ``A_t + w * (A_s M^T - A_t)`` (w along the token axis). Multiplied out with V_t this is
  ``A_t ((1 - w) V_t) + A_s (M^T (w V_t))``: the usual fused attention call for all rows with the
  target's values scaled by 1 - w, plus one fused call with the source's Q/K and the mapped
  values ``M^T (w V_t)``, added to the target row. No probabilities are materialised; with w = 0
  the first call is the plain one and the second adds exact zeros.
- Self-attention in the small layers (the local-blend level and every level below it, mid block
  included): with the gate on, the target row's Q and K are the source row's (selected exactly,
  ``Where``), so ``softmax(Q_s K_s^T) V_t`` stays one fused attention call over all rows.
- Self-attention in the large layers: the diffusers processor itself (LAVIS replaces nothing
  there), so these keep exactly the graph pattern of ``unet_plain`` and its fusions.
- Cross-attention at the local-blend level, additionally: the source row's probabilities A_s,
  computed explicitly (small: the level is 16x16 at SD 1.5's 512x512), averaged over the heads of
  all those layers: the ``cross_attention_maps`` output [T, h/b, w/b] (b: the level's factor).

The level. LAVIS hard-codes "at most 16x16 pixels" (self-attention) and "16x16" (local blend),
which is right for SD 1.5 at 512x512 only. Here the level is the deepest down block with
cross-attention (SD 1.5: the third, 16x16 at 512x512), found from the UNet itself, so the same
layers are controlled at any image size and in any UNet of this family (the tiny test configs).
Its downsampling factor is ``PipelineConfig.edit_attention_downsample``.
"""

from __future__ import annotations

import contextlib
import re

import torch
import torch.nn.functional as F
from torch import nn

_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.|^(mid_block)\.")


def layer_downsample(name: str, num_levels: int) -> int:
    """Downsampling factor (from the latent) at which the attention processor ``name`` runs.

    Down block i attends before its downsampler (factor 2^i), up block i before its upsampler
    (2^(L-1-i)), the mid block at the bottom (2^(L-1)); L = number of UNet levels.
    """
    match = _BLOCK.match(name)
    if match is None:
        raise ValueError(f"attention processor {name!r} is in no UNet block")
    if match.group(3):
        return 2 ** (num_levels - 1)
    index = int(match.group(2))
    return 2 ** index if match.group(1) == "down_blocks" else 2 ** (num_levels - 1 - index)


def _is_cross(name: str) -> bool:
    return name.endswith("attn2.processor")


def edit_attention_downsample(unet) -> int:
    """The local-blend level's factor: the deepest down block with cross-attention (0: none)."""
    levels = len(unet.config.block_out_channels)
    factors = [layer_downsample(n, levels) for n in unet.attn_processors if n.startswith("down_blocks") and _is_cross(n)]
    return max(factors, default=0)


class P2PControl:
    """The control inputs of one UNet call, and the blend-level maps it records."""

    def __init__(self) -> None:
        self.cross_weights: torch.Tensor | None = None
        self.token_map: torch.Tensor | None = None
        self.self_gate: torch.Tensor | None = None
        self.map_sum: torch.Tensor | None = None
        self.map_heads = 0

    def begin(self, cross_weights: torch.Tensor, token_map: torch.Tensor, self_gate: torch.Tensor) -> None:
        self.cross_weights, self.token_map, self.self_gate = cross_weights, token_map, self_gate
        self.map_sum, self.map_heads = None, 0

    def record(self, probs: torch.Tensor) -> None:
        """Source-row probabilities [1, heads, pixels, T] of one blend-level layer."""
        total = probs.sum(dim=1)
        self.map_sum = total if self.map_sum is None else self.map_sum + total
        self.map_heads += probs.shape[1]


class P2PAttnProcessor:
    """``AttnProcessor2_0`` with the control of the module docstring (``cross`` or small ``self``)."""

    def __init__(self, control: P2PControl, *, cross: bool, blend: bool = False):
        self.control = control
        self.cross = cross
        self.blend = blend

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if attention_mask is not None:
            raise ValueError("prompt-to-prompt control takes no attention mask (the UNet passes none)")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if self.cross:
            hidden_states = self._cross(attn, query, key, value)
        else:
            hidden_states = self._self(query, key, value)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _cross(self, attn, query, key, value):
        # A_t (1 - w) V_t + A_s M^T (w V_t): two fused calls, no probabilities (module docstring)
        weights = self.control.cross_weights.to(value.dtype).view(1, 1, -1, 1)
        target_values = value[-1:]
        kept = torch.cat([value[:-1], target_values * (1 - weights)])
        out = F.scaled_dot_product_attention(query, key, kept)
        mapped = torch.matmul(self.control.token_map.to(value.dtype).transpose(0, 1), target_values * weights)
        taken = F.scaled_dot_product_attention(query[-2:-1], key[-2:-1], mapped)
        if self.blend:
            scores = torch.matmul(query[-2:-1], key[-2:-1].transpose(-1, -2)) * attn.scale
            self.control.record(scores.softmax(dim=-1))
        return torch.cat([out[:-1], out[-1:] + taken])

    def _self(self, query, key, value):
        # the target row attends with the source's Q and K when the gate is on: softmax(Q_s K_s^T) V_t
        gate = self.control.self_gate > 0.5
        target_query = torch.where(gate, query[-2:-1], query[-1:])
        target_key = torch.where(gate, key[-2:-1], key[-1:])
        query = torch.cat([query[:-1], target_query])
        key = torch.cat([key[:-1], target_key])
        return F.scaled_dot_product_attention(query, key, value)


def p2p_processors(unet, control: P2PControl) -> dict:
    """Processor per attention layer: control where the module docstring says, diffusers' elsewhere."""
    levels = len(unet.config.block_out_channels)
    level = edit_attention_downsample(unet)
    if not level:
        raise ValueError("the UNet has no down block with cross-attention: prompt-to-prompt control needs one")
    processors = {}
    for name, original in unet.attn_processors.items():
        factor = layer_downsample(name, levels)
        if _is_cross(name):
            blend = factor == level and not name.startswith("mid_block")
            processors[name] = P2PAttnProcessor(control, cross=True, blend=blend)
        elif factor >= level:
            processors[name] = P2PAttnProcessor(control, cross=False)
        else:
            processors[name] = original
    return processors


@contextlib.contextmanager
def attention_processors(unet, processors: dict):
    """Install ``processors`` on ``unet`` for the duration (the other graphs share the UNet)."""
    original = unet.attn_processors
    unet.set_attn_processor(dict(processors))  # diffusers empties the dict it is given
    try:
        yield
    finally:
        unet.set_attn_processor(original)


class UNetP2PGraph(nn.Module):
    """sample, timestep, encoder_hidden_states, cross_weights, token_map, self_gate -> noise_pred, maps."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        self.level = edit_attention_downsample(unet)
        self.control = P2PControl()
        self.processors = p2p_processors(unet, self.control)

    def forward(self, sample, timestep, encoder_hidden_states, cross_weights, token_map, self_gate):
        self.control.begin(cross_weights, token_map, self_gate)
        with attention_processors(self.unet, self.processors):
            noise_pred = self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
        maps = self.control.map_sum[0] / self.control.map_heads  # [pixels, T], mean over heads and layers
        tokens = maps.shape[-1]
        maps = maps.transpose(0, 1).reshape(tokens, -1, sample.shape[-1] // self.level)
        self.control.begin(None, None, None)
        return noise_pred, maps
