"""TensorRT optimization profiles, derived from the component declarations.

Nothing here imports TensorRT: the builder turns the result into ``IOptimizationProfile.set_shape``
calls, the runtime checks shapes against it, and the tests check it on any machine.

Two modes (``blipdiffusion-trt build --shapes``):

``static`` (default)
    min = opt = max at one generation size: ``--batch`` prompts (default 1), so the UNet and the
    ControlNet run at twice that (classifier-free guidance runs them on [negative; positive]),
    ``--height``/``--width`` pixels (default: the package's ``default_height``/``default_width``)
    and the text lengths the runtime always feeds (the context and plain text encoders are fed
    padded to their full lengths). Fastest engines; other sizes need a rebuild.

    Two exceptions, axes whose length a request decides at any one size
    (:data:`DATA_DEPENDENT_AXES`), keep their declared range in both modes: the Q-Former's text is
    padded to the longest category word (``qformer_text_length``; the Q-Former runs once per
    subject, its cost does not matter), and an edit runs ``unet_p2p`` on 4 rows (a generated image
    with guidance), 3 (a real image: its source reconstructs without guidance) or 2 (no guidance)
    (``p2p_batch``). Kept dynamic, one engine serves every edit at the cost of every row it runs,
    where padding to a fixed 4 rows would cost a real-image edit a third more UNet work per step
    and an unguided one twice as much; the engine's kernels are tuned at 4 rows (the declared opt).

    A batchable component (rows independent, ``ComponentSpec.batch_axis``) fed fewer rows than a
    static engine's runs padded to them (``runtime/backends/tensorrt.py``): the DDIM inversion's
    single ``unet_plain`` row in the engine built for a guided generation's two.

``dynamic``
    The declared min/opt/max of every axis, narrowed by ``--batch``, ``--height`` and ``--width``
    given as ``N`` (fixed) or ``MIN:OPT:MAX``. The UNet/ControlNet batch runs from the smallest
    prompt batch (guidance <= 1 runs them without the negative half) to twice the largest.

Pixel sizes become latent (and ControlNet residual) sizes through the declaration: each latent
axis names the pixel axis it derives from and its divisor (``Axis.derived_from``/``divisor``),
checked against the declared bounds, so no latent factor is spelled here.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from ..components import Axis, ComponentSpec, PipelineConfig, declare_components
from ..errors import InputError

SHAPE_MODES = ("static", "dynamic")

Range = tuple[int, int, int]
Shape = tuple[int, ...]
# component -> input name -> (min shape, opt shape, max shape)
Profiles = dict[str, dict[str, tuple[Shape, Shape, Shape]]]

# Axes whose length the runtime chooses per call even at one generation size: the Q-Former text
# (pad-to-longest) and an edit's UNet rows (its kind and its guidance).
DATA_DEPENDENT_AXES = ("qformer_text_length", "p2p_batch")


# ------------------------------------------------------------------------------------------------
# Option parsing
# ------------------------------------------------------------------------------------------------

def parse_range(option: str, value: Any) -> Range | None:
    """``None`` | ``N`` | ``"N"`` | ``"MIN:OPT:MAX"`` | ``(MIN, OPT, MAX)`` -> ``(min, opt, max)``.

    Only the syntax is checked here (integers, MIN <= OPT <= MAX); bounds come from the package.
    """
    if value is None:
        return None
    usage = f"{option} must be an integer N or MIN:OPT:MAX"
    if isinstance(value, bool):
        raise InputError(f"{usage}, got {value!r}")
    if isinstance(value, int):
        values: list[Any] = [value]
    elif isinstance(value, str):
        values = [v.strip() for v in value.strip().split(":")]
    elif isinstance(value, (tuple, list)):
        values = list(value)
    else:
        raise InputError(f"{usage}, got {value!r}")
    if len(values) not in (1, 3):
        raise InputError(f"{usage}, got {_show(value)}")
    numbers = []
    for v in values:
        if isinstance(v, bool):
            raise InputError(f"{usage}, got {_show(value)}")
        try:
            numbers.append(int(v))
        except (TypeError, ValueError):
            raise InputError(f"{usage}, got {_show(value)}") from None
    if len(numbers) == 1:
        return (numbers[0],) * 3  # type: ignore[return-value]
    low, opt, high = numbers
    if not low <= opt <= high:
        raise InputError(f"{option} MIN:OPT:MAX must satisfy MIN <= OPT <= MAX, got {low}:{opt}:{high}")
    return (low, opt, high)


def format_range(value: Range | None) -> str | None:
    """The option text of a range: ``"N"`` when fixed, else ``"MIN:OPT:MAX"``."""
    if value is None:
        return None
    low, opt, high = value
    return str(low) if low == opt == high else f"{low}:{opt}:{high}"


def _show(value: Any) -> str:
    return repr(value) if not isinstance(value, str) else repr(value.strip())


def check_shapes_mode(shapes: str) -> str:
    if shapes not in SHAPE_MODES:
        raise InputError(f"--shapes must be one of {', '.join(SHAPE_MODES)}, got {shapes!r}")
    return shapes


# ------------------------------------------------------------------------------------------------
# Axis ranges
# ------------------------------------------------------------------------------------------------

def declared_axes(config: PipelineConfig) -> dict[str, Axis]:
    """Every axis of every declared component, by name (one declaration per name)."""
    axes: dict[str, Axis] = {}
    for spec in declare_components(config).values():
        for name, axis in spec.axes.items():
            previous = axes.setdefault(name, axis)
            if previous != axis:  # the declaration must not give one name two ranges
                raise ValueError(f"axis {name} is declared twice differently: {previous} vs {axis}")
    return axes


def _within(option: str, value: Range, axis: Axis) -> None:
    low, high, step = axis.min, axis.max, axis.multiple_of
    allowed = f"in [{low}, {high}]" if step == 1 else f"a multiple of {step} in [{low}, {high}]"
    for v in value:
        if not low <= v <= high or v % step:
            raise InputError(f"{option} must be {allowed}, got {format_range(value)}")


def axis_ranges(
    config: PipelineConfig,
    shapes: str = "static",
    *,
    batch: Any = None,
    height: Any = None,
    width: Any = None,
) -> dict[str, Range]:
    """(min, opt, max) of every declared axis for a build; raises :class:`InputError` (one line)."""
    check_shapes_mode(shapes)
    options = {"batch": parse_range("--batch", batch), "height": parse_range("--height", height),
               "width": parse_range("--width", width)}
    if shapes == "static":
        for name, value in options.items():
            if value is not None and not value[0] == value[1] == value[2]:
                raise InputError(
                    f"--{name}: --shapes static takes one value N, got {format_range(value)}; "
                    f"use --shapes dynamic for MIN:OPT:MAX"
                )
    axes = declared_axes(config)
    ranges: dict[str, Range] = {}

    # Prompt batch, and the UNet/ControlNet batch derived from it.
    batch_axis = axes["batch"]
    b = options["batch"]
    if b is None:
        b = (batch_axis.opt,) * 3 if shapes == "static" else (batch_axis.min, batch_axis.opt, batch_axis.max)
    else:
        _within("--batch", b, batch_axis)
    ranges["batch"] = b

    # Pixel sizes: the package's default size (the declared opt) unless given.
    for name in ("height", "width"):
        axis = axes[name]
        value = options[name]
        if value is None:
            value = (axis.opt,) * 3 if shapes == "static" else (axis.min, axis.opt, axis.max)
        else:
            _within(f"--{name}", value, axis)
        ranges[name] = value

    for name, axis in axes.items():
        if name in ranges:
            continue
        if name == "unet_batch":
            if shapes == "static":
                value = (2 * b[1],) * 3
            else:
                value = (b[0], 2 * b[1], 2 * b[2])
            value = tuple(min(max(v, axis.min), axis.max) for v in value)  # type: ignore[assignment]
        elif axis.derived_from is not None:
            value = _derived_range(axis, axes, ranges)
        elif name in DATA_DEPENDENT_AXES or shapes == "dynamic":
            value = (axis.min, axis.opt, axis.max)
        else:
            value = (axis.opt,) * 3
        ranges[name] = value  # type: ignore[assignment]
    return ranges


def _derived_range(axis: Axis, axes: Mapping[str, Axis], ranges: Mapping[str, Range]) -> Range:
    """A latent/residual axis from the (pixel) axis it derives from, divided by its declared divisor."""
    source = axes[axis.derived_from]  # type: ignore[index]
    divisor = axis.divisor
    if divisor < 1 or any(
        p // divisor != q for p, q in ((source.min, axis.min), (source.opt, axis.opt), (source.max, axis.max))
    ):
        raise ValueError(f"axis {axis.name} {axis} is not {source.name} {source} divided by {divisor}")
    return tuple(v // divisor for v in ranges[source.name])  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------
# Profiles per component
# ------------------------------------------------------------------------------------------------

def component_profiles(
    config: PipelineConfig,
    shapes: str = "static",
    *,
    batch: Any = None,
    height: Any = None,
    width: Any = None,
    components: Iterable[str] | None = None,
) -> Profiles:
    """``{component: {input: (min_shape, opt_shape, max_shape)}}`` for the package's components."""
    ranges = axis_ranges(config, shapes, batch=batch, height=height, width=width)
    specs = declare_components(config)
    names = list(specs) if components is None else list(components)
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise InputError(f"--components: unknown {', '.join(unknown)} (this package has {', '.join(specs)})")
    return {name: spec_profile(specs[name], ranges) for name in names}


def spec_profile(spec: ComponentSpec, ranges: Mapping[str, Range]) -> dict[str, tuple[Shape, Shape, Shape]]:
    points = [{name: r[i] for name, r in ranges.items()} for i in range(3)]
    return {t.name: tuple(t.shape_at(p) for p in points) for t in spec.inputs}  # type: ignore[misc]


def profile_to_json(profile: Mapping[str, tuple[Shape, Shape, Shape]]) -> dict[str, dict[str, list[int]]]:
    return {name: {"min": list(lo), "opt": list(opt), "max": list(hi)} for name, (lo, opt, hi) in profile.items()}


def profile_from_json(data: Mapping[str, Mapping[str, list[int]]]) -> dict[str, tuple[Shape, Shape, Shape]]:
    return {name: (tuple(v["min"]), tuple(v["opt"]), tuple(v["max"])) for name, v in data.items()}


def check_shape(name: str, shape: Iterable[int], profile: tuple[Shape, Shape, Shape]) -> str | None:
    """None when ``shape`` fits the profile's [min, max] box, else why not (one line)."""
    shape = tuple(int(d) for d in shape)
    low, _, high = profile
    if len(shape) != len(low):
        return f"input {name} has {len(shape)} dimensions {list(shape)}, the engine takes {len(low)} ({list(low)})"
    if all(lo <= d <= hi for d, lo, hi in zip(shape, low, high)):
        return None
    if low == high:
        return f"input {name} has shape {list(shape)}, the engine was built for exactly {list(low)}"
    return f"input {name} has shape {list(shape)}, outside the engine's profile {list(low)} .. {list(high)}"
