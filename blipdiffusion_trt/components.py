"""One declaration per exported component: names, dtypes, symbolic shapes, ranges, tolerances.

Export (dynamic axes, example inputs), the TensorRT builder (optimization profiles), the Triton
writer (dims, batching) and the tests all read these declarations; nothing else spells a shape.
Every size comes from the package's :class:`PipelineConfig`, which export derives from the
checkpoint's own configs, so no dimension of one particular checkpoint is written here.

This module imports only the standard library: the runtime, the engine builder and the export
code all depend on it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .errors import PackageError
from .schema import Bool, Int, List, Number, Object, check

# Bounds of what a package may declare (pipeline.json): far above any BLIP-Diffusion checkpoint
# (Stable Diffusion 1.5: 512 px default, 77 text positions, 768 hidden), low enough that no
# declared size asks for an absurd allocation. A package outside them is refused when opened.
MAX_DECLARED_IMAGE_SIZE = 2048  # pixels per side of a generated image (export declares 2 x the default)
MAX_DECLARED_BATCH_SIZE = 64
MAX_DECLARED_SUBJECT_IMAGE_SIZE = 1024  # pixels per side of the Q-Former's input image (224 in the paper)
MAX_DECLARED_TEXT_POSITIONS = 4096
MAX_DECLARED_WIDTH = 65536  # hidden sizes and channels
MAX_DECLARED_VOCABULARY = 10_000_000  # token ids


@dataclass(frozen=True)
class PipelineConfig:
    """Everything the runtime needs to know about a checkpoint, besides the graphs themselves.

    Written by export into the package (``pipeline.json``, see :mod:`blipdiffusion_trt.package`);
    all fields are read from the checkpoint's configs.
    """

    ctx_begin_pos: int
    # Q-Former side
    image_size: tuple[int, int]  # (height, width) of the subject image fed to the vision encoder
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    image_resample: int  # PIL resampling filter id (3 = bicubic)
    num_query_tokens: int
    qformer_hidden_size: int
    qformer_max_text_length: int
    # text encoder side
    text_max_length: int  # CLIP max_position_embeddings: context tokens + prompt tokens
    text_hidden_size: int
    # latent space
    latent_channels: int
    latent_scale_factor: int  # image size / latent size
    unet_size_multiple: int  # latent sizes must be multiples of this (UNet down/up sampling)
    vae_scaling_factor: float
    unet_block_out_channels: tuple[int, ...]
    unet_layers_per_block: int
    default_height: int
    default_width: int
    has_controlnet: bool
    controlnet_conditioning_channels: int = 3
    max_batch_size: int = 4
    # Declared image-size range (pixels). Profiles, validation and Triton configs read it.
    min_image_size: int = 0
    max_image_size: int = 0
    # Editing (prompt-to-prompt): the UNet level, as its downsampling factor from the latent, whose
    # cross-attention maps drive the local blend and at and below which self-attention is replaced
    # (export/p2p.py); 0: the package has no editing graphs (exported before editing existed).
    edit_attention_downsample: int = 0
    # Fast mode (DeepCache, branch 0): channels of the deep feature a full UNet step hands to the
    # shallow steps after it, the hidden state entering the last layer of the last up block
    # (export reads it from the UNet); 0: the package has no step-cache graphs.
    step_cache_channels: int = 0
    # The word embeddings' sizes (token ids the text encoders / the Q-Former accept): a package's
    # tokenizers must not produce ids past them. 0: not recorded (an older export).
    text_vocab_size: int = 0
    qformer_vocab_size: int = 0

    def __post_init__(self) -> None:
        if not self.min_image_size:
            object.__setattr__(self, "min_image_size", self.image_multiple)
        if not self.max_image_size:
            largest = min(2 * max(self.default_height, self.default_width), MAX_DECLARED_IMAGE_SIZE)
            object.__setattr__(self, "max_image_size", largest - largest % self.image_multiple)

    @property
    def text_length(self) -> int:
        """Prompt tokens the context text encoder takes: the rest of its positions hold the subject."""
        return self.text_max_length - self.num_query_tokens

    @property
    def has_editing(self) -> bool:
        """Whether the package holds the editing graphs (``vae_encoder``, ``unet_p2p``)."""
        return self.edit_attention_downsample > 0

    @property
    def has_step_cache(self) -> bool:
        """Whether the package holds the step-cache graphs (:func:`step_cache_components`)."""
        return self.step_cache_channels > 0

    @property
    def image_multiple(self) -> int:
        """Generated heights and widths must be multiples of this many pixels."""
        return self.latent_scale_factor * self.unet_size_multiple

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "pipeline config") -> "PipelineConfig":
        """The config from its dict (unknown keys ignored), checked against :data:`PIPELINE_CONFIG_SHAPE`
        (types, ranges, consistency); ``source`` names it in the one-line :class:`PackageError`."""
        data = check(data, PIPELINE_CONFIG_SHAPE, source=source, error=PackageError)
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in data.items():
            if key not in names:
                continue
            kwargs[key] = tuple(value) if isinstance(value, list) else value
        return cls(**kwargs)


def _sizes(d: Mapping[str, Any]) -> tuple[int, int, int]:
    """(multiple, min, max) of generated image sides as the config will have them (0: the default)."""
    multiple = d["latent_scale_factor"] * d["unet_size_multiple"]
    low = d.get("min_image_size") or multiple
    high = d.get("max_image_size") or 0
    if not high:
        high = min(2 * max(d["default_height"], d["default_width"]), MAX_DECLARED_IMAGE_SIZE)
        high -= high % multiple
    return multiple, low, high


def _edit_level_ok(level: int, levels: int) -> bool:
    """0, or the downsampling factor 2 ** k of one of the UNet's ``levels`` levels."""
    return level == 0 or (level & (level - 1) == 0 and level <= 2 ** (levels - 1))


_SIDE = Int(1, MAX_DECLARED_IMAGE_SIZE)
_POSITIONS = Int(1, MAX_DECLARED_TEXT_POSITIONS)
_WIDTH = Int(1, MAX_DECLARED_WIDTH)
_SMALL = Int(1, 64)

# What pipeline.json must hold (PipelineConfig's fields, their types and bounds), and the rules
# between fields the declarations (components, profiles, Triton dims) rely on.
PIPELINE_CONFIG_SHAPE = Object(
    required={
        "ctx_begin_pos": Int(0, MAX_DECLARED_TEXT_POSITIONS),
        "image_size": List(Int(1, MAX_DECLARED_SUBJECT_IMAGE_SIZE), length=2),
        "image_mean": List(Number(-1e3, 1e3), length=3),
        "image_std": List(Number(high=1e3, above=0), length=3),
        "image_resample": Int(0, 5),  # PIL's resampling filters
        "num_query_tokens": _POSITIONS,
        "qformer_hidden_size": _WIDTH,
        "qformer_max_text_length": _POSITIONS,
        "text_max_length": _POSITIONS,
        "text_hidden_size": _WIDTH,
        "latent_channels": _SMALL,
        "latent_scale_factor": _SMALL,
        "unet_size_multiple": _SMALL,
        "vae_scaling_factor": Number(high=1e3, above=0),
        "unet_block_out_channels": List(_WIDTH, min_length=1, max_length=16),
        "unet_layers_per_block": _SMALL,
        "default_height": _SIDE,
        "default_width": _SIDE,
        "has_controlnet": Bool(),
    },
    optional={
        "controlnet_conditioning_channels": _SMALL,
        "max_batch_size": Int(1, MAX_DECLARED_BATCH_SIZE),
        "min_image_size": Int(0, MAX_DECLARED_IMAGE_SIZE),
        "max_image_size": Int(0, MAX_DECLARED_IMAGE_SIZE),
        "step_cache_channels": Int(0, MAX_DECLARED_WIDTH),
        "edit_attention_downsample": Int(0, 2 ** 15),
        "text_vocab_size": Int(0, MAX_DECLARED_VOCABULARY),
        "qformer_vocab_size": Int(0, MAX_DECLARED_VOCABULARY),
    },
    rules=(
        ("unet_size_multiple must be a multiple of 2 ** (len(unet_block_out_channels) - 1) (the UNet's downsampling)",
         lambda d: d["unet_size_multiple"] % 2 ** (len(d["unet_block_out_channels"]) - 1) == 0),
        ("edit_attention_downsample must be 0 (no editing graphs) or the downsampling of a UNet level: "
         "2 ** k with 2 ** k <= 2 ** (len(unet_block_out_channels) - 1)",
         lambda d: _edit_level_ok(d.get("edit_attention_downsample", 0), len(d["unet_block_out_channels"]))),
        ("text_max_length must exceed num_query_tokens + ctx_begin_pos + 1 (the prompt needs room)",
         lambda d: d["text_max_length"] > d["num_query_tokens"] + d["ctx_begin_pos"] + 1),
        ("qformer_max_text_length must exceed num_query_tokens",
         lambda d: d["qformer_max_text_length"] > d["num_query_tokens"]),
        ("min_image_size and max_image_size must be multiples of latent_scale_factor x unet_size_multiple "
         "with min_image_size <= max_image_size",
         lambda d: _sizes(d)[1] % _sizes(d)[0] == 0 and _sizes(d)[2] % _sizes(d)[0] == 0
         and 0 < _sizes(d)[1] <= _sizes(d)[2]),
        ("default_height and default_width must be multiples of latent_scale_factor x unet_size_multiple "
         "within [min_image_size, max_image_size]",
         lambda d: all(d[k] % _sizes(d)[0] == 0 and _sizes(d)[1] <= d[k] <= _sizes(d)[2]
                       for k in ("default_height", "default_width"))),
    ),
)


@dataclass(frozen=True)
class Axis:
    """A dynamic axis with its optimization range: TensorRT's min/opt/max, Triton's -1.

    A latent axis is another axis scaled down: ``derived_from`` names that (pixel) axis and
    ``divisor`` is the factor, so a value of this axis is always ``value of derived_from // divisor``.
    """

    name: str
    min: int
    opt: int
    max: int
    multiple_of: int = 1
    derived_from: str | None = None
    divisor: int = 1

    def check(self, value: int) -> str | None:
        """None when ``value`` is allowed, else why not (one line)."""
        if not self.min <= value <= self.max:
            return f"{self.name}={value} outside [{self.min}, {self.max}]"
        if value % self.multiple_of:
            return f"{self.name}={value} is not a multiple of {self.multiple_of}"
        return None


Dim = int | Axis


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name of the fp32 graph's tensor ("float32", "int64")
    shape: tuple[Dim, ...]

    def shape_at(self, point: str | Mapping[str, int]) -> tuple[int, ...]:
        """Concrete shape at "min"/"opt"/"max", or with the named axes set from a mapping."""
        dims = []
        for dim in self.shape:
            if isinstance(dim, int):
                dims.append(dim)
            elif isinstance(point, str):
                dims.append(getattr(dim, point))
            else:
                dims.append(point[dim.name])
        return tuple(dims)

    @property
    def axes(self) -> dict[int, str]:
        return {i: d.name for i, d in enumerate(self.shape) if isinstance(d, Axis)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": [d if isinstance(d, int) else d.name for d in self.shape],
        }


@dataclass(frozen=True)
class ComponentSpec:
    """One exported graph: its I/O, its dynamic axes and how closely it must match PyTorch."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # Export validation (ONNX Runtime CPU fp32 vs PyTorch fp32), max abs difference.
    atol: float = 1e-4
    # fp16 graph vs fp32 graph.
    fp16_min_cosine: float = 0.999
    # Whether requests can be batched along axis 0 (Triton dynamic batching).
    batchable: bool = True
    description: str = ""
    # onnxruntime.transformers optimizer model type for the CPU-fused fp32 graph (None: no such graph).
    cpu_fusion: str | None = None
    # optimizer model type for the fp16 graph with ONNX Runtime's CUDA fusions (None: no such graph).
    gpu_fusion: str | None = None

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def axes(self) -> dict[str, Axis]:
        found: dict[str, Axis] = {}
        for tensor in (*self.inputs, *self.outputs):
            for dim in tensor.shape:
                if isinstance(dim, Axis):
                    found[dim.name] = dim
        return found

    @property
    def batch_axis(self) -> Axis | None:
        """The axis whose rows are independent requests (Triton batches along it; a TensorRT engine
        runs fewer rows padded): None unless ``batchable`` and every tensor starts with the same axis."""
        if not self.batchable:
            return None
        firsts = {t.shape[0] if t.shape and isinstance(t.shape[0], Axis) else None for t in (*self.inputs, *self.outputs)}
        if len(firsts) != 1:
            return None
        (axis,) = firsts
        return axis

    def axis_values(self, input_shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
        """Axis name -> value, read off the given input shapes; an axis the inputs do not show is
        derived through the declaration (``derived_from``/``divisor``: a latent axis from its pixel
        axis, a pixel axis from its latent one). Axes that cannot be derived are left out."""
        values: dict[str, int] = {}
        for tensor in self.inputs:
            shape = input_shapes.get(tensor.name)
            if shape is None or len(shape) != len(tensor.shape):
                continue
            for dim, size in zip(tensor.shape, shape):
                if isinstance(dim, Axis):
                    values.setdefault(dim.name, int(size))
        axes = self.axes
        changed = True
        while changed:
            changed = False
            for name, axis in axes.items():
                if name in values:
                    continue
                if axis.derived_from in values:
                    values[name] = values[axis.derived_from] // axis.divisor
                    changed = True
                    continue
                source = next((a for a in axes.values() if a.derived_from == name and a.name in values), None)
                if source is not None:
                    values[name] = values[source.name] * source.divisor
                    changed = True
                    continue
                # a sibling derived from the same pixel axis, which this component does not show
                # (unet_p2p: its attention maps' axis from its latent axis)
                sibling = next((a for a in axes.values() if axis.derived_from is not None
                                and a.derived_from == axis.derived_from and a.name in values), None)
                if sibling is not None:
                    values[name] = values[sibling.name] * sibling.divisor // axis.divisor
                    changed = True
        return values

    def output_shapes(self, input_shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]] | None:
        """The outputs' shapes for these input shapes, from the declaration; None when an output
        axis is not determined by the inputs (e.g. the context text encoder's output length)."""
        values = self.axis_values(input_shapes)
        if any(isinstance(d, Axis) and d.name not in values for t in self.outputs for d in t.shape):
            return None
        return {t.name: t.shape_at(values) for t in self.outputs}

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: t.axes for t in (*self.inputs, *self.outputs) if t.axes}

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "axes": {a.name: dataclasses.asdict(a) for a in self.axes.values()},
            "atol": self.atol,
            "fp16_min_cosine": self.fp16_min_cosine,
            "cpu_fusion": self.cpu_fusion,
            "gpu_fusion": self.gpu_fusion,
        }


def controlnet_residual_shapes(
    config: PipelineConfig, batch: Dim, latent_h: Dim, latent_w: Dim
) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """(channels, downsampling) of every ControlNet down residual, and of the mid residual.

    Mirrors UNet2DConditionModel's down path: conv_in, then per block ``layers_per_block``
    resnets and (except for the last block) one downsampler.
    """
    channels = config.unet_block_out_channels
    residuals = [(channels[0], 1)]
    scale = 1
    for i, ch in enumerate(channels):
        residuals += [(ch, scale)] * config.unet_layers_per_block
        if i < len(channels) - 1:
            scale *= 2
            residuals.append((ch, scale))
    return residuals, (channels[-1], scale)


def _scaled_axis(axis: Axis, divisor: int, name: str) -> Axis:
    """``axis`` divided by ``divisor``, recorded as derived from the axis ``axis`` itself derives from."""
    return Axis(name, axis.min // divisor, axis.opt // divisor, axis.max // divisor,
                max(1, axis.multiple_of // divisor), derived_from=axis.derived_from or axis.name,
                divisor=axis.divisor * divisor)


def declare_components(config: PipelineConfig) -> dict[str, ComponentSpec]:
    """The package's components, in pipeline order, with shapes read from ``config``."""
    f = config.latent_scale_factor
    multiple = config.image_multiple
    batch = Axis("batch", 1, 1, config.max_batch_size)
    # Classifier-free guidance runs the UNet (and ControlNet) on [negative; positive].
    unet_batch = Axis("unet_batch", 1, 2, 2 * config.max_batch_size)
    height = Axis("height", config.min_image_size, config.default_height, config.max_image_size, multiple)
    width = Axis("width", config.min_image_size, config.default_width, config.max_image_size, multiple)
    latent_h = _scaled_axis(height, f, "latent_height")
    latent_w = _scaled_axis(width, f, "latent_width")
    qformer_text = Axis("qformer_text_length", 1, 8, config.qformer_max_text_length - config.num_query_tokens)
    text_len = Axis("text_length", config.ctx_begin_pos, config.text_length, config.text_length)
    plain_text_len = Axis("plain_text_length", 1, config.text_max_length, config.text_max_length)
    c = config.latent_channels
    hidden = config.text_hidden_size
    ih, iw = config.image_size

    def embeddings(batch_axis: Axis, length: Dim) -> TensorSpec:
        return TensorSpec("encoder_hidden_states", "float32", (batch_axis, length, hidden))

    unet_io = (
        TensorSpec("sample", "float32", (unet_batch, c, latent_h, latent_w)),
        TensorSpec("timestep", "float32", (unet_batch,)),
        embeddings(unet_batch, config.text_max_length),
    )
    down, (mid_ch, mid_scale) = controlnet_residual_shapes(config, unet_batch, latent_h, latent_w)

    def residual(name: str, ch: int, scale: int) -> TensorSpec:
        if scale == 1:
            return TensorSpec(name, "float32", (unet_batch, ch, latent_h, latent_w))
        return TensorSpec(
            name, "float32",
            (unet_batch, ch, _scaled_axis(latent_h, scale, f"latent_height_{scale}"),
             _scaled_axis(latent_w, scale, f"latent_width_{scale}")),
        )

    residuals = tuple(residual(f"down_block_res_{i}", ch, s) for i, (ch, s) in enumerate(down))
    residuals += (residual("mid_block_res", mid_ch, mid_scale),)
    noise = (TensorSpec("noise_pred", "float32", (unet_batch, c, latent_h, latent_w)),)

    specs = [
        ComponentSpec(
            "qformer",
            inputs=(
                TensorSpec("pixel_values", "float32", (batch, 3, ih, iw)),
                TensorSpec("input_ids", "int64", (batch, qformer_text)),
                TensorSpec("attention_mask", "int64", (batch, qformer_text)),
            ),
            outputs=(TensorSpec("query_embeds", "float32", (batch, config.num_query_tokens, config.qformer_hidden_size)),),
            description="ViT vision encoder + query transformer + projection: subject image and word -> query embeddings",
        ),
        ComponentSpec(
            "text_encoder",
            inputs=(
                TensorSpec("input_ids", "int64", (batch, text_len)),
                TensorSpec("ctx_embeddings", "float32", (batch, config.num_query_tokens, hidden)),
            ),
            outputs=(TensorSpec("text_embeddings", "float32", (batch, Axis("ctx_text_length", config.ctx_begin_pos + config.num_query_tokens, config.text_max_length, config.text_max_length), hidden)),),
            description=f"CLIP text encoder with the subject embeddings spliced in at position {config.ctx_begin_pos}",
        ),
        ComponentSpec(
            "text_encoder_plain",
            inputs=(TensorSpec("input_ids", "int64", (batch, plain_text_len)),),
            outputs=(TensorSpec("text_embeddings", "float32", (batch, plain_text_len, hidden)),),
            description="CLIP text encoder without subject context (negative prompt)",
        ),
        ComponentSpec(
            "unet",
            inputs=unet_io + residuals,
            outputs=noise,
            description="UNet with ControlNet residual inputs",
            cpu_fusion="unet", gpu_fusion="unet",
        ),
        ComponentSpec("unet_plain", inputs=unet_io, outputs=noise, description="UNet without residual inputs",
                      cpu_fusion="unet", gpu_fusion="unet"),
    ]
    if config.has_controlnet:
        specs.append(ComponentSpec(
            "controlnet",
            inputs=unet_io + (
                TensorSpec("controlnet_cond", "float32", (unet_batch, config.controlnet_conditioning_channels, height, width)),
                TensorSpec("conditioning_scale", "float32", (1,)),
            ),
            outputs=residuals,
            description="ControlNet: condition image -> UNet residuals (scaled by conditioning_scale)",
            cpu_fusion="unet", gpu_fusion="unet",
        ))
    specs.append(ComponentSpec(
        "vae_decoder",
        inputs=(TensorSpec("latents", "float32", (batch, c, latent_h, latent_w)),),
        outputs=(TensorSpec("image", "float32", (batch, 3, height, width)),),
        description="VAE decoder: unscaled latents -> image in [-1, 1]",
        gpu_fusion="vae",
    ))
    if config.has_editing:
        specs += _editing_components(config, batch, height, width, latent_h, latent_w)
    if config.has_step_cache:
        specs += _step_cache_components(config, unet_io, residuals, noise, unet_batch, height, width, latent_h, latent_w)
    return {spec.name: spec for spec in specs}


@dataclass(frozen=True)
class StepCacheGraphs:
    """The graphs of fast mode (DeepCache, branch 0) for one kind of generation: ``full`` is the
    whole UNet returning the deep feature too, ``shallow`` only what branch 0 runs with that feature
    (time embedding, conv_in, the last up layer, norm and conv_out); ``controlnet``: the shallow
    ControlNet (its first residual only, the one residual a shallow step reads), None without one."""

    full: str
    shallow: str
    controlnet: str | None = None

    @property
    def names(self) -> list[str]:
        return [n for n in (self.controlnet, self.full, self.shallow) if n]


DEEP_FEATURE = "deep_feature"
PLAIN_STEP_CACHE = StepCacheGraphs("unet_plain_full_step", "unet_plain_shallow_step")
CONTROLNET_STEP_CACHE = StepCacheGraphs("unet_full_step", "unet_shallow_step", "controlnet_shallow_step")


def step_cache_graphs(config: PipelineConfig, *, control: bool) -> StepCacheGraphs | None:
    """The fast-mode graphs a generation with (``control``) or without the ControlNet runs; None when
    the package has none."""
    if not config.has_step_cache or (control and not config.has_controlnet):
        return None
    return CONTROLNET_STEP_CACHE if control else PLAIN_STEP_CACHE


def step_cache_components(config: PipelineConfig) -> list[str]:
    """Every fast-mode graph of the package: the plain UNet pair, and with a ControlNet the
    ControlNet UNet pair and the shallow ControlNet (none for a package exported without them)."""
    if not config.has_step_cache:
        return []
    names = list(PLAIN_STEP_CACHE.names)
    return names + CONTROLNET_STEP_CACHE.names if config.has_controlnet else names


def _step_cache_components(config: PipelineConfig, unet_io: tuple[TensorSpec, ...], residuals: tuple[TensorSpec, ...],
                           noise: tuple[TensorSpec, ...], unet_batch: Axis, height: Axis, width: Axis,
                           latent_h: Axis, latent_w: Axis) -> list[ComponentSpec]:
    """The step-cache graphs (export/modules.py: ``UNetFullStepGraph``, ``UNetShallowStepGraph``,
    ``ControlNetShallowStepGraph``). The last up block runs at the latent size, so the deep feature
    does too."""
    deep = TensorSpec(DEEP_FEATURE, "float32", (unet_batch, config.step_cache_channels, latent_h, latent_w))
    first_residual = residuals[0]
    specs = [
        ComponentSpec(PLAIN_STEP_CACHE.full, inputs=unet_io, outputs=noise + (deep,),
                      description="fast mode, full step: UNet without residual inputs, also returning the deep feature",
                      cpu_fusion="unet", gpu_fusion="unet"),
        ComponentSpec(PLAIN_STEP_CACHE.shallow, inputs=unet_io + (deep,), outputs=noise,
                      description="fast mode, shallow step: the UNet's last up layer on the cached deep feature",
                      cpu_fusion="unet", gpu_fusion="unet"),
    ]
    if config.has_controlnet:
        specs += [
            ComponentSpec(
                CONTROLNET_STEP_CACHE.controlnet,
                inputs=(unet_io[0],
                        TensorSpec("controlnet_cond", "float32", (unet_batch, config.controlnet_conditioning_channels, height, width)),
                        TensorSpec("conditioning_scale", "float32", (1,))),
                outputs=(first_residual,),
                description="fast mode, shallow step: the ControlNet's first residual only (scaled by conditioning_scale)",
            ),
            ComponentSpec(CONTROLNET_STEP_CACHE.full, inputs=unet_io + residuals, outputs=noise + (deep,),
                          description="fast mode, full step: UNet with ControlNet residual inputs, also returning "
                                      "the deep feature", cpu_fusion="unet", gpu_fusion="unet"),
            ComponentSpec(CONTROLNET_STEP_CACHE.shallow, inputs=unet_io + (deep, first_residual), outputs=noise,
                          description="fast mode, shallow step: the UNet's last up layer on the cached deep feature "
                                      "and the ControlNet's first residual", cpu_fusion="unet", gpu_fusion="unet"),
        ]
    return specs


# Editing runs the UNet on [uncond_src, uncond_tgt, cond_src, cond_tgt]; the control acts on the
# last two rows. A real image's source needs no guidance (3 rows), no guidance at all needs 2.
P2P_PAIR_ROWS = 2
P2P_MAX_ROWS = 4


def _editing_components(config: PipelineConfig, batch: Axis, height: Axis, width: Axis,
                        latent_h: Axis, latent_w: Axis) -> list[ComponentSpec]:
    """``vae_encoder`` and ``unet_p2p`` (export/p2p.py documents the control tensors)."""
    c = config.latent_channels
    tokens = config.text_max_length
    rows = Axis("p2p_batch", P2P_PAIR_ROWS, P2P_MAX_ROWS, P2P_MAX_ROWS)
    level = config.edit_attention_downsample
    map_h = latent_h if level == 1 else _scaled_axis(latent_h, level, f"latent_height_{level}")
    map_w = latent_w if level == 1 else _scaled_axis(latent_w, level, f"latent_width_{level}")
    latent = (rows, c, latent_h, latent_w)
    return [
        ComponentSpec(
            "vae_encoder",
            inputs=(TensorSpec("image", "float32", (batch, 3, height, width)),),
            outputs=(TensorSpec("latent_mean", "float32", (batch, c, latent_h, latent_w)),
                     TensorSpec("latent_logvar", "float32", (batch, c, latent_h, latent_w))),
            description="VAE encoder: image in [-1, 1] -> mean and log-variance of the latent posterior (unscaled)",
        ),
        ComponentSpec(
            "unet_p2p",
            inputs=(
                TensorSpec("sample", "float32", latent),
                TensorSpec("timestep", "float32", (rows,)),
                TensorSpec("encoder_hidden_states", "float32", (rows, tokens, config.text_hidden_size)),
                TensorSpec("cross_weights", "float32", (tokens,)),
                TensorSpec("token_map", "float32", (tokens, tokens)),
                TensorSpec("self_gate", "float32", (1,)),
            ),
            outputs=(
                TensorSpec("noise_pred", "float32", latent),
                TensorSpec("cross_attention_maps", "float32", (tokens, map_h, map_w)),
            ),
            # the control tensors have no batch axis, and the rows are one edit: never batched
            batchable=False,
            description="UNet with prompt-to-prompt attention control of the last two rows (source, target) "
                        "and the source's cross-attention maps at the local-blend level",
            cpu_fusion="unet",
        ),
    ]


def generation_components(config: PipelineConfig) -> list[str]:
    """The components one generation runs, in pipeline order: what the runtime loads, Triton serves
    and the benchmark measures (``unet_plain`` for a plain package, ``controlnet`` + ``unet`` for a
    ControlNet package)."""
    names = ["qformer", "text_encoder", "text_encoder_plain"]
    names += ["controlnet", "unet"] if config.has_controlnet else ["unet_plain"]
    return names + ["vae_decoder"]


def editing_components(config: PipelineConfig) -> list[str]:
    """The components editing runs besides a generation's text encoders, Q-Former and VAE decoder:
    the VAE encoder (real images), the plain UNet (DDIM inversion) and the prompt-to-prompt UNet;
    none for a package exported without editing."""
    return ["vae_encoder", "unet_plain", "unet_p2p"] if config.has_editing else []
