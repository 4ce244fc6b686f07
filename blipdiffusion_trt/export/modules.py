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
