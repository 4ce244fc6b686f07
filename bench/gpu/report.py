"""``validation.md`` from ``validation.json`` (also for a partial run: every table shows what exists)."""

from __future__ import annotations

import math
from typing import Any

SIDES = ("ours", "diffusers", "diffusers-compile")
# row label, key in a pipeline's results ("stages/<name>" for one call), kind
LATENCY_ROWS = (
    ("whole generation", "generation", "time"),
    ("first generation (warm-up)", "first_generation_s", "time"),
    ("host overhead per step", "host_overhead_per_step", "time"),
    ("UNet, 1 call (guidance batch)", "stages/unet_plain", "time"),
    ("UNet with residuals, 1 call", "stages/unet", "time"),
    ("ControlNet, 1 call", "stages/controlnet", "time"),
    ("Q-Former, 1 call", "stages/qformer", "time"),
    ("text encoder with subject, 1 call", "stages/text_encoder", "time"),
    ("text encoder plain, 1 call", "stages/text_encoder_plain", "time"),
    ("VAE decoder, 1 call", "stages/vae_decoder", "time"),
)


def _fmt_time(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if value >= 1.0:
        return f"{value:.2f} s"
    if value >= 1e-3:
        return f"{value * 1e3:.1f} ms"
    return f"{value * 1e6:.0f} µs"


def _value(pipeline: dict[str, Any], key: str) -> float | None:
    node: Any = pipeline
    for part in key.split("/"):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if isinstance(node, dict):
        return node.get("p50")
    return node


def all_passed(data: dict[str, Any]) -> bool:
    checks = [c.get("passed") for c in data.get("accuracy", {}).get("components", {}).values()]
    checks += [r.get("passed") for r in data.get("image_parity", {}).values() if "passed" in r]
    return bool(checks) and all(checks)


def unet_floor(data: dict[str, Any]) -> dict[str, Any] | None:
    """UNet FLOPs per guidance step, the measured (or datasheet) fp16 rate, and each side's fraction."""
    flops = data.get("flops", {}).get("unet_plain", {}).get("flops")
    if not flops:
        return None
    ceiling = (data.get("accuracy") or {}).get("ceiling")
    rate, source = (ceiling["tflops"], ceiling["method"]) if ceiling else (None, None)
    out = {"tflop_per_step": flops / 1e12, "ceiling_tflops": rate, "ceiling_source": source, "fraction": {}}
    if rate:
        floor = flops / (rate * 1e12)
        out["floor_s"] = floor
        for side, result in data.get("sides", {}).items():
            call = _value(result.get("pipelines", {}).get("plain", {}), "stages/unet_plain")
            if call:
                out["fraction"][side] = floor / call
    return out


def markdown(data: dict[str, Any]) -> str:
    mode = data["mode"]
    env = data.get("environment", {})
    versions = env.get("versions", {})
    gens = data.get("generations", {})
    gen = gens.get("plain", {})
    lines = [f"### GPU validation ({mode['name']}): {env.get('gpu', 'CPU')}", ""]
    lines.append(f"`{' '.join(data['command'])}` — {data['created']}; {data.get('elapsed_s', 0):.0f} s of a "
                 f"{data['budget_s']:.0f} s budget. torch {versions.get('torch')}, onnxruntime "
                 f"{env.get('onnxruntime_module_version')}, numpy {versions.get('numpy')}, diffusers "
                 f"{versions.get('diffusers')}, transformers {versions.get('transformers')}; driver {env.get('driver', '–')}.")
    if gen:
        graphs = " (CUDA-fused where the package has them)" if mode["device"] == "cuda" else ""
        threads = "" if mode["device"] == "cuda" else " One thread per side (dry run on a shared CPU: the figures only prove the code runs)."
        lines.append(f"{mode['size']} random weights, {gen['height']}x{gen['width']}, {gen['steps']} PNDM steps, "
                     f"guidance {gen['guidance']}, batch 1; ours: `{mode['backend']}` backend, {mode['precision']} graphs"
                     f"{graphs}; diffusers {mode['diffusers_precision']} on {mode['device']}.{threads}")
    for problem in data.get("environment_problems", []):
        lines.append(f"- **environment:** {problem}")

    components = data.get("accuracy", {}).get("components", {})
    if components:
        lines += ["", "Per component, ours vs PyTorch fp32 on the same device (example inputs at the generation's shapes):",
                  "", "| component | graph | cosine | max abs | rel L2 | finite | criterion | pass |",
                  "|---|---|---:|---:|---:|---|---|---|"]
        for name, m in components.items():
            lines.append(f"| {name} | {m.get('graph')} | {m['cosine']:.6f} | {m['max_abs']:.3g} | {m['rel_l2']:.3g} | "
                         f"{'yes' if m['finite'] else '**no**'} | {m['criterion']} | {'PASS' if m['passed'] else '**FAIL**'} |")
    parity = data.get("image_parity", {})
    if parity:
        lines += ["", "Whole generations, identical latents (PSNR, dB, images in [0, 1]):", "",
                  "| pipeline | ours vs diffusers | ours vs diffusers fp32 | diffusers vs diffusers fp32 | pass |",
                  "|---|---:|---:|---:|---|"]
        for key, row in parity.items():
            cells = [f"{row[k]:.1f}" if k in row else "–"
                     for k in ("ours_vs_diffusers", "ours_vs_diffusers_fp32", "diffusers_vs_diffusers_fp32")]
            verdict = "–" if "passed" not in row else ("PASS" if row["passed"] else "**FAIL**")
            lines.append(f"| {key} | " + " | ".join(cells) + f" | {verdict} |")
        criterion = next((r["criterion"] for r in parity.values() if "criterion" in r), None)
        if criterion:
            lines += ["", f"Criterion: {criterion}."]

    sides = data.get("sides", {})
    present = [s for s in SIDES if s in sides]
    if present:
        for key in ("plain", "controlnet"):
            if not any(key in sides[s].get("pipelines", {}) for s in present):
                continue
            header = ["stage"] + [sides[s].get("label", s) for s in present]
            if "ours" in present and len(present) > 1:
                header += [f"{sides[s].get('label', s)} / ours" for s in present if s != "ours"]
            lines += ["", f"Latency, {key} pipeline (p50):", "", "| " + " | ".join(header) + " |",
                      "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
            for label, row_key, _ in LATENCY_ROWS:
                values = {s: _value(sides[s].get("pipelines", {}).get(key, {}), row_key) for s in present}
                if all(v is None for v in values.values()):
                    continue
                cells = [label] + [_fmt_time(values[s]) for s in present]
                if "ours" in present and len(present) > 1:
                    for s in present:
                        if s != "ours":
                            ratio = values[s] / values["ours"] if values.get(s) and values.get("ours") else None
                            cells.append(f"{ratio:.2f}" if ratio else "–")
                lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "| side | load | device memory (MB) | method |", "|---|---:|---:|---|"]
        for s in present:
            memory = sides[s].get("memory", {})
            lines.append(f"| {sides[s].get('label', s)} | {_fmt_time(sides[s].get('load_s'))} | "
                         f"{memory.get('mb') if memory.get('mb') is not None else '–'} | {memory.get('method') or '–'} |")
        lines += ["", "Host overhead per step: (denoising loop − time in UNet/ControlNet calls) / steps. Ours: "
                  "wall time of each (blocking) call; diffusers: CUDA-event time of each module call in one extra "
                  "instrumented generation (the timed generations carry no hooks). Ratios above 1: ours is faster."]
    floor = unet_floor(data)
    if floor:
        lines += ["", f"Physical floor: the UNet does {floor['tflop_per_step'] * 1e3:.4g} GFLOP per guidance step "
                  f"(fp32 graph, Conv/MatMul/Gemm/Einsum, 2 x MACs)"
                  + (f"; at the measured {floor['ceiling_tflops']:.0f} TFLOP/s ({floor['ceiling_source']}) that is "
                     f"{_fmt_time(floor['floor_s'])} per call." if floor.get("ceiling_tflops") else ".")]
        for side, fraction in floor.get("fraction", {}).items():
            lines.append(f"- {sides.get(side, {}).get('label', side)}: {fraction:.1%} of the floor")
    captured = {k: v for k, v in (sides.get("ours", {}).get("engine_cuda_graphs") or {}).items() if v is not None}
    if captured:
        lines += ["", "Our engines' CUDA graphs in the measured generations (captured graphs per component): "
                  + ", ".join(f"{k} {v}" for k, v in captured.items()) + "."]
    graphs = sides.get("ours", {}).get("cuda_graphs") if sides else None
    if graphs:
        lines += ["", "ONNX Runtime CUDA graphs probed per component (own sessions, `enable_cuda_graph`, device-bound "
                  "I/O; the data behind the cuda backend's choice of the UNet and ControlNet):", "",
                  "| component | captured | replay p50 | max abs vs eager | note |", "|---|---|---:|---:|---|"]
        for name, g in graphs.items():
            lines.append(f"| {name} | {'yes' if g['ok'] else 'no'} | {_fmt_time(g['replay']['p50']) if g['ok'] else '–'} | "
                         f"{g['max_abs_vs_eager']:.3g} | |" if g["ok"] else f"| {name} | no | – | – | {g['error']} |")
    lines += ["", "| step | status | seconds |", "|---|---|---:|"]
    for name, phase in data.get("phases", {}).items():
        lines.append(f"| {name} | {phase['status']} | {phase['seconds']:.1f} |")
    if data.get("tensorrt_imported"):
        lines.append("- **TensorRT was imported**: this run was meant to need none")
    return "\n".join(lines) + "\n"
