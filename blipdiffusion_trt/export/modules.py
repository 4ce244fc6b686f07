"""Export-friendly torch wrappers of the BLIP-Diffusion components.

Each wrapper takes exactly the inputs its :class:`~blipdiffusion_trt.components.ComponentSpec`
declares, in that order, and computes what diffusers' pipeline computes, rewritten where the
original does not trace well:

- the context text encoder splices the subject embeddings with one loop-free concat (diffusers
  loops over the batch in Python, which the exporters unroll to the example batch);
- attention masks use -1e4 rather than ``finfo(float32).min``, which is -inf in fp16 and turns
  attention rows into NaN; after the softmax the result is identical in fp32;
- tokenization stays outside the graphs (the Q-Former's ``forward`` tokenizes internally).
"""

from __future__ import annotations

import torch
from torch import nn

MASK_VALUE = -1.0e4


class QFormerGraph(nn.Module):
    """pixel_values, input_ids, attention_mask -> query embeddings (Blip2QFormerModel.forward)."""

    def __init__(self, qformer):
        super().__init__()
        self.qformer = qformer

    def forward(self, pixel_values, input_ids, attention_mask):
        q = self.qformer
        emb = q.embeddings
        batch = input_ids.shape[0]
        num_queries = q.query_tokens.shape[1]
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        text = emb.word_embeddings(input_ids) + emb.position_embeddings(positions)[None]
        queries = q.query_tokens.expand(batch, -1, -1)
        hidden = emb.LayerNorm(torch.cat([queries, text], dim=1).to(queries.dtype))

        image_embeds = q.visual_encoder(pixel_values).last_hidden_state
        query_mask = torch.ones((batch, num_queries), dtype=attention_mask.dtype, device=attention_mask.device)
        mask = torch.cat([query_mask, attention_mask], dim=1)[:, None, None, :].to(hidden.dtype)
        mask = (1.0 - mask) * MASK_VALUE
        out = q.encoder(
            hidden,
            attention_mask=mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=None,
            return_dict=False,
            query_length=num_queries,
        )[0]
        return q.proj_layer(out[:, :num_queries, :])


def _causal_mask(length: int, dtype, device) -> torch.Tensor:
    mask = torch.full((length, length), MASK_VALUE, dtype=dtype, device=device).triu(1)
    return mask[None, None]


class ContextTextEncoderGraph(nn.Module):
    """input_ids [B, L], ctx_embeddings [B, Q, H] -> text embeddings [B, L + Q, H].

    ``ctx_begin_pos`` is a constant of the checkpoint (the pipeline passes the same position for
    every batch item), so it is baked into the graph.
    """

    def __init__(self, text_encoder, ctx_begin_pos: int):
        super().__init__()
        self.text_model = text_encoder.text_model
        self.ctx_begin_pos = ctx_begin_pos

    def forward(self, input_ids, ctx_embeddings):
        tm = self.text_model
        tokens = tm.embeddings.token_embedding(input_ids)
        p = self.ctx_begin_pos
        hidden = torch.cat([tokens[:, :p], ctx_embeddings.to(tokens.dtype), tokens[:, p:]], dim=1)
        return _encode(tm, hidden)


class PlainTextEncoderGraph(nn.Module):
    """input_ids [B, L] -> text embeddings [B, L, H] (the negative prompt: no subject context)."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_model = text_encoder.text_model

    def forward(self, input_ids):
        return _encode(self.text_model, self.text_model.embeddings.token_embedding(input_ids))


def _encode(text_model, hidden):
    length = hidden.shape[1]
    positions = torch.arange(length, device=hidden.device)
    hidden = hidden + text_model.embeddings.position_embedding(positions)[None]
    causal = _causal_mask(length, hidden.dtype, hidden.device)
    out = text_model.encoder(inputs_embeds=hidden, attention_mask=None, causal_attention_mask=causal, return_dict=False)[0]
    return text_model.final_layer_norm(out)


class UNetGraph(nn.Module):
    """sample, timestep [N], encoder_hidden_states[, down residuals..., mid residual] -> noise_pred."""

    def __init__(self, unet, with_residuals: bool):
        super().__init__()
        self.unet = unet
        self.with_residuals = with_residuals

    def forward(self, sample, timestep, encoder_hidden_states, *residuals):
        kwargs = {}
        if self.with_residuals:
            kwargs = dict(
                down_block_additional_residuals=tuple(residuals[:-1]),
                mid_block_additional_residual=residuals[-1],
            )
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False, **kwargs)[0]


class ControlNetGraph(nn.Module):
    """sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale [1] -> residuals."""

    def __init__(self, controlnet):
        super().__init__()
        self.controlnet = controlnet

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale):
        down, mid = self.controlnet(
            sample, timestep, encoder_hidden_states=encoder_hidden_states,
            controlnet_cond=controlnet_cond, conditioning_scale=1.0, return_dict=False,
        )
        scale = conditioning_scale.to(mid.dtype)
        return (*[d * scale for d in down], mid * scale)


class VaeDecoderGraph(nn.Module):
    """latents already divided by the VAE scaling factor -> image in [-1, 1] (unclipped)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents, return_dict=False)[0]


class VaeEncoderGraph(nn.Module):
    """image in [-1, 1] -> mean and log-variance (clamped as diffusers does) of the latent posterior."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, image):
        posterior = self.vae.encode(image, return_dict=False)[0]
        return posterior.mean, posterior.logvar


# ------------------------------------------------------------------------------------------------
# Fast mode: DeepCache's branch 0 (Ma et al., "DeepCache: Accelerating Diffusion Models for Free")
# ------------------------------------------------------------------------------------------------
#
# On a skip step DeepCache's ``DeepCacheSDHelper`` (cache_branch_id=0) returns every down block,
# the mid block and every up layer but the last one of the last up block from the last full step;
# only the last layer of the last up block runs, on the cached hidden state that enters it and the
# fresh skip connection of conv_in. The full-step graph returns that hidden state (the deep
# feature); the shallow-step graph runs only what the skip step computes fresh.


def step_cache_channels(unet) -> int:
    """Channels of DeepCache branch 0's deep feature: what enters the last resnet of the last up
    block besides conv_in's skip connection (the first skip a UNet makes is the last it consumes)."""
    return int(unet.up_blocks[-1].resnets[-1].in_channels) - int(unet.conv_in.out_channels)


def step_cache_unsupported(unet) -> str | None:
    """Why the step-cache graphs cannot be written for this UNet (None: they can): the shallow step
    computes the time embedding as UNet2DConditionModel does for Stable Diffusion's UNet, so extra
    embeddings are not reproduced."""
    for name in ("class_embedding", "add_embedding", "time_embed_act", "encoder_hid_proj"):
        if getattr(unet, name, None) is not None:
            return f"the UNet has a {name}"
    if unet.config.center_input_sample:
        return "the UNet centres its input sample"
    if getattr(unet.up_blocks[-1], "upsamplers", None):
        return "the last up block upsamples"
    return None


class UNetFullStepGraph(UNetGraph):
    """As :class:`UNetGraph`, also returning the deep feature (the hidden state entering the last
    layer of the last up block, before its concatenation with conv_in's skip connection)."""

    def forward(self, sample, timestep, encoder_hidden_states, *residuals):
        channels = step_cache_channels(self.unet)
        captured = []

        def capture(module, args):
            captured.append(args[0][:, :channels])  # resnet(cat([hidden, skip]), temb)

        handle = self.unet.up_blocks[-1].resnets[-1].register_forward_pre_hook(capture)
        try:
            noise_pred = super().forward(sample, timestep, encoder_hidden_states, *residuals)
        finally:
            handle.remove()
        return noise_pred, captured[-1]


class UNetShallowStepGraph(nn.Module):
    """sample, timestep, encoder_hidden_states, deep_feature[, first ControlNet residual] -> noise_pred:
    UNet2DConditionModel.forward restricted to what DeepCache's branch-0 skip step computes."""

    def __init__(self, unet, with_residual: bool):
        super().__init__()
        self.unet = unet
        self.with_residual = with_residual

    def forward(self, sample, timestep, encoder_hidden_states, deep_feature, *residual):
        unet = self.unet
        # 1. time (get_time_embed broadcasts the timestep over the batch)
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
        # 2. pre-process: conv_in is the skip connection the last up layer reads (plus ControlNet's first residual)
        skip = unet.conv_in(sample)
        if self.with_residual:
            skip = skip + residual[0]
        # 3. the last layer of the last up block, on the cached deep feature
        block = unet.up_blocks[-1]
        hidden = block.resnets[-1](torch.cat([deep_feature, skip], dim=1), emb)
        if getattr(block, "attentions", None):
            hidden = block.attentions[-1](hidden, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
        # 4. post-process
        if unet.conv_norm_out is not None:
            hidden = unet.conv_act(unet.conv_norm_out(hidden))
        return unet.conv_out(hidden)


class ControlNetShallowStepGraph(nn.Module):
    """sample, controlnet_cond, conditioning_scale [1] -> the first residual of ControlNetModel.forward
    (conv_in + conditioning embedding, then the first zero convolution): all a shallow step reads."""

    def __init__(self, controlnet):
        super().__init__()
        self.controlnet = controlnet

    def forward(self, sample, controlnet_cond, conditioning_scale):
        cn = self.controlnet
        if cn.config.controlnet_conditioning_channel_order == "bgr":
            controlnet_cond = torch.flip(controlnet_cond, dims=[1])
        hidden = cn.conv_in(sample) + cn.controlnet_cond_embedding(controlnet_cond)
        return cn.controlnet_down_blocks[0](hidden) * conditioning_scale.to(hidden.dtype)
