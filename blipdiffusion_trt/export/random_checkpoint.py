"""Real diffusers BLIP-Diffusion checkpoints with random weights.

Model weights cannot be downloaded where this project is developed and tested, so tests, the
demo and the benchmark build checkpoints from architecture configs (tiny ones here, the full-size
one in ``configs/blipdiffusion-full.json``) with random weights, save them with diffusers'
``save_pretrained`` and load them back through the real loading code.

Random weights as diffusers initialises them hide bugs: the Q-Former vision weights start near
zero, the query tokens at zero and ControlNet's zero-convolutions at zero, so the subject image and
the condition image have no effect at all. :func:`make_sensitive` re-initialises every layer with
fan-in scaled normals and calibrates the output convolutions, so that every input the pipeline
takes visibly moves the final image (the fixtures' sensitivity is itself tested).
"""

from __future__ import annotations

import copy
import json
import logging
import math
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .tokenizer_files import qformer_vocab_size, write_clip_tokenizer, write_qformer_bert_tokenizer

logger = logging.getLogger(__name__)

QFORMER_TOKENIZER_DIR = "qformer_tokenizer"
CONTROLNET_RESIDUAL_GAIN = 4.0
CONTROLNET_CONDITION_GAIN = 8.0


def full_config() -> dict[str, Any]:
    """The full-size Salesforce/blipdiffusion architecture (public config values)."""
    text = resources.files("blipdiffusion_trt.configs").joinpath("blipdiffusion-full.json").read_text()
    return json.loads(text)


def _tiny_config(
    *, text_positions: int, query_tokens: int, image_size: int,
    unet_channels: tuple[int, ...], vae_channels: tuple[int, ...], sample_size: int,
) -> dict[str, Any]:
    hidden = 32
    down = ["CrossAttnDownBlock2D"] * (len(unet_channels) - 1) + ["DownBlock2D"]
    up = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (len(unet_channels) - 1)
    common_unet = dict(
        block_out_channels=list(unet_channels), layers_per_block=1, norm_num_groups=8,
        in_channels=4, down_block_types=down, cross_attention_dim=hidden, attention_head_dim=8,
    )
    return {
        "text_encoder": {"kwargs": dict(
            vocab_size=49408, hidden_size=hidden, intermediate_size=37, projection_dim=hidden,
            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=text_positions,
            hidden_act="quick_gelu",
        )},
        "qformer": {"kwargs": dict(
            vision_config=dict(hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                               num_attention_heads=2, image_size=image_size, patch_size=14,
                               hidden_act="quick_gelu"),
            qformer_config=dict(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=37, max_position_embeddings=64,
                                cross_attention_frequency=1, encoder_hidden_size=hidden),
            num_query_tokens=query_tokens,
        )},
        "unet": {"kwargs": dict(common_unet, sample_size=sample_size, out_channels=4, up_block_types=up)},
        "vae": {"kwargs": dict(
            in_channels=3, out_channels=3, latent_channels=4, act_fn="silu",
            block_out_channels=list(vae_channels), layers_per_block=1, norm_num_groups=8,
            down_block_types=["DownEncoderBlock2D"] * len(vae_channels),
            up_block_types=["UpDecoderBlock2D"] * len(vae_channels),
            sample_size=sample_size * 2 ** (len(vae_channels) - 1), scaling_factor=0.18215,
        )},
        "controlnet": {"kwargs": dict(
            common_unet,
            conditioning_embedding_out_channels=[8] + [16] * (len(unet_channels) - 1),
        )},
        "scheduler": full_config()["scheduler"],
        "image_processor": {"kwargs": {"size": {"height": image_size, "width": image_size}}},
    }


def tiny_config() -> dict[str, Any]:
    """Like diffusers' own BLIP-Diffusion test configs: 77 text positions, 16 queries, factor 2."""
    return _tiny_config(text_positions=77, query_tokens=16, image_size=224,
                        unet_channels=(32, 64), vae_channels=(16, 32), sample_size=16)


def tiny_odd_config() -> dict[str, Any]:
    """Unlike any real config: 40 text positions, 6 queries, 42 px subject image, latent factor 4."""
    return _tiny_config(text_positions=40, query_tokens=6, image_size=42,
                        unet_channels=(16, 32, 32), vae_channels=(16, 16, 16), sample_size=8)


CONFIGS = {"tiny": tiny_config, "tiny-odd": tiny_odd_config, "full": full_config}


@torch.no_grad()
def _reinit(module: nn.Module, generator: torch.Generator) -> None:
    """Fan-in scaled normal weights, small biases, unit-scale embeddings, near-1 norm gains."""

    def normal_(tensor: torch.Tensor, std: float) -> None:
        tensor.copy_(torch.randn(tensor.shape, generator=generator) * std)

    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            normal_(layer.weight, 1.0 / math.sqrt(layer.weight[0].numel()))
            if layer.bias is not None:
                normal_(layer.bias, 0.02)
        elif isinstance(layer, nn.Embedding):
            normal_(layer.weight, 1.0)
        elif isinstance(layer, (nn.LayerNorm, nn.GroupNorm)) and layer.weight is not None:
            normal_(layer.weight, 0.1)
            layer.weight.add_(1.0)


@torch.no_grad()
def make_controlnet_sensitive(controlnet, generator: torch.Generator) -> None:
    """No zero convolutions, strong residuals, and a condition image that dominates its input."""
    _reinit(controlnet, generator)
    # Trained ControlNets steer the UNet strongly; fan-in scaled residuals barely register.
    for conv in (*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block):
        conv.weight.mul_(CONTROLNET_RESIDUAL_GAIN)
    controlnet.controlnet_cond_embedding.conv_out.weight.mul_(CONTROLNET_CONDITION_GAIN)


@torch.no_grad()
def make_sensitive(pipe, seed: int = 0) -> None:
    """Re-initialise all weights so every pipeline input matters (see module docstring)."""
    generator = torch.Generator().manual_seed(seed)

    def normal_(tensor: torch.Tensor, std: float) -> None:
        tensor.copy_(torch.randn(tensor.shape, generator=generator) * std)

    for module in (pipe.text_encoder, pipe.qformer, pipe.unet, pipe.vae):
        _reinit(module, generator)
    normal_(pipe.qformer.query_tokens, 1.0)
    if getattr(pipe, "controlnet", None) is not None:
        make_controlnet_sensitive(pipe.controlnet, generator)

    # Calibrate output layers on typical inputs: noise predictions of unit scale (as a trained
    # UNet gives) and decoded images mostly inside [-1, 1], so the final clip does not hide changes.
    unet, vae = pipe.unet, pipe.vae
    size = unet.config.sample_size
    latents = torch.randn((2, unet.config.in_channels, size, size), generator=generator)
    hidden = torch.randn((2, 8, unet.config.cross_attention_dim), generator=generator)
    out = unet(latents, 500, encoder_hidden_states=hidden).sample
    unet.conv_out.weight.div_(out.std())
    unet.conv_out.bias.zero_()
    decoded = vae.decode(latents / vae.config.scaling_factor).sample
    vae.decoder.conv_out.weight.mul_(0.45 / decoded.std())
    vae.decoder.conv_out.bias.sub_(decoded.mean(dim=(0, 2, 3)) * 0.45 / decoded.std())


def _build_pipeline(config: dict[str, Any], work_dir: Path, *, controlnet: bool, mean: list[float] | None = None,
                    std: list[float] | None = None, tokenizer=None):
    """A diffusers BLIP-Diffusion (ControlNet) pipeline of architecture ``config`` with
    diffusers' initial weights (on the current torch device: "meta" builds it without memory).

    The Q-Former's BERT tokenizer is written to ``work_dir/qformer_tokenizer``:
    ``Blip2QFormerModel.__init__`` loads its tokenizer from ``config.tokenizer``.
    """
    from diffusers import AutoencoderKL, ControlNetModel, PNDMScheduler, UNet2DConditionModel
    from diffusers.pipelines import BlipDiffusionControlNetPipeline, BlipDiffusionPipeline
    from diffusers.pipelines.blip_diffusion.blip_image_processing import BlipImageProcessor
    from diffusers.pipelines.blip_diffusion.modeling_blip2 import Blip2QFormerModel
    from diffusers.pipelines.blip_diffusion.modeling_ctx_clip import ContextCLIPTextModel
    from transformers import CLIPTextConfig
    from transformers.models.blip_2.configuration_blip_2 import Blip2Config

    config = copy.deepcopy(config)
    bert_dir = write_qformer_bert_tokenizer(work_dir / QFORMER_TOKENIZER_DIR)
    qformer_kwargs = config["qformer"]["kwargs"]
    qformer_kwargs["qformer_config"]["vocab_size"] = max(
        qformer_kwargs["qformer_config"].get("vocab_size", 0), qformer_vocab_size(bert_dir)
    )
    # built in this order: the random initial weights depend on it
    text_encoder = ContextCLIPTextModel(CLIPTextConfig(**config["text_encoder"]["kwargs"]))
    qformer = Blip2QFormerModel(Blip2Config(**qformer_kwargs, tokenizer=str(bert_dir)))
    unet = UNet2DConditionModel(**config["unet"]["kwargs"])
    vae = AutoencoderKL(**config["vae"]["kwargs"])
    components = dict(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet,
        scheduler=PNDMScheduler(**config["scheduler"]["kwargs"]), qformer=qformer,
        image_processor=BlipImageProcessor(**config["image_processor"]["kwargs"]), mean=mean, std=std,
    )
    if controlnet:
        components["controlnet"] = ControlNetModel(**config["controlnet"]["kwargs"])
        pipe = BlipDiffusionControlNetPipeline(**components)
    else:
        pipe = BlipDiffusionPipeline(**components)
    for module in pipe.components.values():
        if isinstance(module, nn.Module):
            module.eval()
    return pipe


def build_random_checkpoint(
    out_dir: str | Path,
    config: dict[str, Any] | str = "tiny",
    *,
    controlnet: bool = False,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    seed: int = 0,
    sensitive: bool = True,
) -> Path:
    """Build a random-weight BLIP-Diffusion (ControlNet) pipeline and ``save_pretrained`` it.

    ``mean``/``std`` go to model_index.json as the real checkpoint's do. The Q-Former's BERT
    tokenizer is written inside the checkpoint and ``qformer/config.json`` points at it, because
    ``Blip2QFormerModel.__init__`` loads its tokenizer from ``config.tokenizer`` (a hub id in the
    real checkpoint); the checkpoint therefore must not be moved after it is built.
    """
    from transformers import CLIPTokenizer

    if isinstance(config, str):
        config = CONFIGS[config]()
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)

    clip_dir = write_clip_tokenizer(out_dir / "_clip_tokenizer_src")
    pipe = _build_pipeline(config, out_dir, controlnet=controlnet, mean=mean, std=std,
                           tokenizer=CLIPTokenizer.from_pretrained(clip_dir))
    if sensitive:
        make_sensitive(pipe, seed)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    _remove_tree(clip_dir)
    logger.info("wrote random-weight %s checkpoint to %s", type(pipe).__name__, out_dir)
    return out_dir


def architecture_pipeline_config(config: dict[str, Any] | str = "full", *, controlnet: bool = True,
                                 max_batch_size: int = 4):
    """The ``PipelineConfig`` export writes into a package of architecture ``config`` (e.g. the
    full-size one), read by export's own code from the architecture's modules built on the
    "meta" device: no weights, no memory, no export."""
    import tempfile

    from .exporter import pipeline_config_from

    if isinstance(config, str):
        config = CONFIGS[config]()
    with tempfile.TemporaryDirectory(prefix="architecture-") as work_dir, torch.device("meta"):
        pipe = _build_pipeline(config, Path(work_dir), controlnet=controlnet)
        return pipeline_config_from(pipe, max_batch_size=max_batch_size)


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def build_random_controlnet(out_dir: str | Path, config: dict[str, Any] | str = "tiny", *, seed: int = 0) -> Path:
    """A standalone random-weight ``ControlNetModel`` directory (for ``export --controlnet``)."""
    from diffusers import ControlNetModel

    if isinstance(config, str):
        config = CONFIGS[config]()
    torch.manual_seed(seed)
    model = ControlNetModel(**config["controlnet"]["kwargs"]).eval()
    make_controlnet_sensitive(model, torch.Generator().manual_seed(seed))
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
