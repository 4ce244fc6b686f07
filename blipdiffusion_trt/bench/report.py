"""The report: a table of p50s with a diffusers/ours ratio per backend, as Markdown and a chart.

:func:`build_table` turns the results into rows (``bench.json``'s ``table``);
:func:`render_markdown` writes ``bench.md``; :func:`render_chart` writes ``bench.png``
(matplotlib).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from .settings import DIFFUSERS, is_diffusers

# Table rows: key, label, unit, kind ("time": lower is better, "rate": higher is better, "memory").
STAGE_ROWS: tuple[tuple[str, str, str], ...] = (
    ("qformer", "Q-Former (1 call)", "time"),
    ("text_encoder", "text encoder, with subject (1 call)", "time"),
    ("text_encoder_plain", "text encoder, plain (1 call)", "time"),
    ("controlnet", "ControlNet (1 call)", "time"),
    ("unet", "UNet with residuals (1 call)", "time"),
    ("unet_plain", "UNet (1 call)", "time"),
    ("unet_p2p", "UNet with prompt-to-prompt control (1 edit call)", "time"),
    ("vae_decoder", "VAE decoder (1 call)", "time"),
    ("scheduler_step", "scheduler step (numpy / torch)", "time"),
    ("host_overhead_per_step", "host overhead per step", "time"),
    ("denoise_loop", "denoising loop", "time"),
    ("generation", "whole generation", "time"),
    ("loop_it_per_s", "denoising loop (it/s)", "rate"),
    ("load_warm", "load, in process", "time"),
    ("first_generation", "first generation, in process (incl. lazy compilation)", "time"),
    ("cold_loaded", "cold start: process start -> loaded", "time"),
    ("cold_first_image", "cold start: process start -> first image", "time"),
    ("peak_rss_mb", "peak host RSS, cold process (MB)", "memory"),
    ("rss_anon_after", "of the RSS after the first image: private (MB)", "memory"),
    ("rss_file_after", "of the RSS after the first image: mapped files, reclaimable (MB)", "memory"),
    ("gpu_memory_mb", "GPU memory, cold process (MB)", "memory"),
)
COMPONENT_STAGES = ("qformer", "text_encoder", "text_encoder_plain", "controlnet", "unet", "unet_plain", "unet_p2p",
                    "vae_decoder")


def _runtime_options_text(options: Mapping[str, Any] | None, backends: list[str]) -> str:
    if not options:
        return ""
    text = ""
    if any(b != "openvino" for b in backends):
        cache = "an optimised-graph cache" if options.get("optimized_cache") else "no optimised-graph cache"
        fused = "CPU-fused graphs where the package has them" if options.get("cpu_fused", True) else "plain fp32 graphs"
        text += (f" ONNX Runtime: graph optimisation {options.get('graph_optimization')}, memory arena "
                 f"{options.get('memory_arena')}, {cache}, {fused}.")
    if "openvino" in backends:
        text += (f" OpenVINO: inference precision {options.get('inference_precision') or 'auto'}"
                 f"{', INT8 weights' if options.get('compress_weights') else ''}.")
    return text


def ours_keys(impls: Mapping[str, Any]) -> list[str]:
    return [k for k in impls if not is_diffusers(k)]


def diffusers_keys(impls: Mapping[str, Any]) -> list[str]:
    """diffusers' rows, the reference (:data:`DIFFUSERS`) first."""
    return sorted((k for k in impls if is_diffusers(k)), key=lambda k: k != DIFFUSERS)


def _short(key: str) -> str:
    """A diffusers row's name in a ratio column: "" for the reference, else its dtype."""
    return "" if key == DIFFUSERS else key[len(DIFFUSERS) + 1:] + " "


def _row_value(impl: Mapping[str, Any], key: str) -> float | None:
    if "error" in impl:
        return None
    if key in COMPONENT_STAGES or key == "scheduler_step":
        stat = impl.get("stages", {}).get(key)
        return stat["p50"] if stat else None
    if key in ("host_overhead_per_step", "denoise_loop", "generation", "loop_it_per_s", "load_warm", "first_generation"):
        stat = impl.get(key)
        return stat["p50"] if stat else None
    cold = impl.get("cold_start") or {}
    if "error" in cold:
        return None
    return {"cold_loaded": cold.get("loaded"), "cold_first_image": cold.get("first_image"),
            "peak_rss_mb": cold.get("peak_rss_mb"), "gpu_memory_mb": cold.get("gpu_memory_mb"),
            "rss_anon_after": cold.get("rss_anon_mb_after_first_image"),
            "rss_file_after": cold.get("rss_file_mb_after_first_image")}.get(key)


def build_table(results: Mapping[str, Any]) -> dict[str, Any]:
    """Rows x implementations (p50), ratio diffusers/ours per backend (>1: ours faster/smaller)."""
    impls = results["implementations"]
    ours, theirs_keys = ours_keys(impls), diffusers_keys(impls)
    flops = results.get("flops", {})
    peaks = results.get("peak_tflops", {})
    rows = []
    for key, label, kind in STAGE_ROWS:
        values = {k: _row_value(impls[k], key) for k in impls}
        if all(v is None for v in values.values()):
            continue
        row: dict[str, Any] = {"key": key, "label": label, "kind": kind, "values": values, "ratios": {}}
        for d in theirs_keys:
            theirs = values.get(d)
            others = [k for k in impls if k != d and (k in ours or d == DIFFUSERS)]
            row["ratios"][d] = {k: (values[k] / theirs if kind == "rate" else theirs / values[k])
                                for k in others if theirs and values.get(k)}
        row["ratio"] = row["ratios"].get(DIFFUSERS, {})
        count = flops.get(key, {}).get("flops")
        if count:
            row["gflop"] = count / 1e9
            row["tflops_achieved"] = {k: count / v / 1e12 for k, v in values.items() if v}
            row["fraction_of_peak"] = {k: row["tflops_achieved"][k] / peaks[k]["tflops"]
                                       for k in row["tflops_achieved"] if peaks.get(k)}
        rows.append(row)
    return {"columns": list(impls), "rows": rows,
            "ratio": "diffusers / ours for times and memory, ours / diffusers for it/s: above 1, ours is better",
            "ratios": "per diffusers row (ratios[diffusers key][row key]), the same ratio against that row; "
                      "'ratio' is against the reference row"}


def _fmt(value: float | None, kind: str) -> str:
    if value is None:
        return "–"
    if kind == "rate":
        return f"{value:.2f} it/s"
    if kind == "memory":
        return f"{value:,.0f}"
    if value >= 1.0:
        return f"{value:.2f} s"
    if value >= 1e-3:
        return f"{value * 1e3:.1f} ms"
    return f"{value * 1e6:.0f} µs"


def render_markdown(results: Mapping[str, Any]) -> str:
    s = results["settings"]
    impls = results["implementations"]
    table = results["table"]
    machine = results["machine"]
    cpu = machine["cpu"]
    gpus = ", ".join(g["name"] for g in machine.get("gpus", [])) or "no GPU"
    versions = results["versions"]
    calls = next((v.get("unet_calls") for v in impls.values() if v.get("unet_calls")), None)
    lines = [
        f"### BLIP-Diffusion{' + ControlNet' if s['controlnet'] else ''}: {s['height']}x{s['width']}, "
        f"{s['steps']} steps ({s['scheduler']}{f', {calls} UNet calls' if calls else ''}), guidance {s['guidance']:g}, "
        f"batch {s['batch']}, {s['precision']}",
        "",
        f"{cpu['model']} ({cpu['usable_cores']} cores usable), {machine.get('ram_gb')} GB RAM, {gpus}; "
        f"onnxruntime {versions.get('onnxruntime') or versions.get('onnxruntime-gpu')}, torch {versions.get('torch', '–')}, "
        f"diffusers {versions.get('diffusers', '–')}. p50 of {s['runs']} runs after {s['warmup']} warm-up "
        f"(single stages: {s['stage_runs']} calls); p90/p99/mean in bench.json. Threads: "
        f"{s['threads'] or 'library defaults'}"
        + (f" (torch {impls[DIFFUSERS]['torch_threads']})" if impls.get(DIFFUSERS, {}).get("torch_threads") else "") + "."
        + _runtime_options_text(s.get("runtime_options"), s.get("backends", [])),
        "",
    ]
    ours, theirs = ours_keys(impls), diffusers_keys(impls)
    columns = [(k, None) for k in theirs]  # (row key, diffusers row of a ratio column)
    for k in ours:
        columns.append((k, None))
        columns += [(k, d) for d in theirs]
    header = ["stage", "GFLOP"] + [impls[k].get("label", k) if d is None else f"× {_short(d)}({k})" for k, d in columns]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    for row in table["rows"]:
        cells = [row["label"], f"{row['gflop']:.3g}" if row.get("gflop") else ""]
        for k, d in columns:
            if d is None:
                cells.append(_fmt(row["values"].get(k), row["kind"]))
            else:
                ratio = row["ratios"].get(d, {}).get(k)
                cells.append(f"{ratio:.2f}" if ratio else "–")
        lines.append("| " + " | ".join(cells) + " |")
    others = [d for d in theirs if d != DIFFUSERS]
    lines += ["", f"×: {table['ratio']}" + (f" (× {', '.join(_short(d).strip() for d in others)}: against that diffusers row)"
                                            if others else "") + ". Single calls replay the exact inputs of a generation (UNet and "
              "ControlNet at the guidance batch); host overhead per step = (denoising loop − UNet/ControlNet "
              "time) / UNet calls, so it includes the scheduler step; it/s counts UNet calls."]

    flop_rows = [r for r in table["rows"] if r.get("tflops_achieved")]
    if flop_rows:
        peaks = results.get("peak_tflops", {})
        lines += ["", "Achieved TFLOP/s (FLOPs from the ONNX graphs at these shapes, 2 x MACs of Conv/MatMul/Gemm/Einsum)"
                  + (" and fraction of the device's peak" if any(peaks.values()) else "; no device peak known, "
                     "pass --peak-tflops for the fraction of the physical floor") + ":", ""]
        header = ["stage", "GFLOP"] + [impls[k].get("label", k) for k in impls]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
        for row in flop_rows:
            cells = [row["label"], f"{row['gflop']:.3g}"]
            for k in impls:
                achieved = row["tflops_achieved"].get(k)
                frac = row.get("fraction_of_peak", {}).get(k)
                cells.append("–" if achieved is None else f"{achieved:.3g}" + (f" ({frac:.1%})" if frac is not None else ""))
            lines.append("| " + " | ".join(cells) + " |")
        known = {k: v for k, v in peaks.items() if v}
        if known:
            lines += [""] + [f"- peak of {impls[k].get('label', k)}: {v['tflops']:g} TFLOP/s ({v['source']})" for k, v in known.items()]
    lines += _edit_section(impls)
    lines += _fast_mode_section(impls, s)
    notes = []
    reference = impls.get(DIFFUSERS, {}).get("label", DIFFUSERS)
    for k in impls:
        diff = impls[k].get("max_abs_image_diff_vs_diffusers")
        if diff is not None:
            notes.append(f"|image difference| {impls[k].get('label', k)} vs {reference}: max {diff:.2e}, mean "
                         f"{impls[k].get('mean_abs_image_diff_vs_diffusers', float('nan')):.2e} (image in [0, 1])")
    for k in ours:
        chosen = impls[k].get("inference_precision")
        if chosen is not None:
            notes.append(f"{impls[k].get('label', k)}: inference precision that ran {chosen}"
                         + (f"; INT8 weights: {', '.join(impls[k]['int8_weights'])}" if impls[k].get("int8_weights") else ""))
    for k, v in impls.items():
        if "error" in v:
            notes.append(f"{v.get('label', k)} failed: {v['error']}")
        elif (v.get("cold_start") or {}).get("error"):
            notes.append(f"{v.get('label', k)} cold start failed: {v['cold_start']['error']}")
    load = machine.get("load_average_at_start")
    if load and cpu.get("usable_cores") and load[0] > 0.5 * cpu["usable_cores"]:
        notes.append(f"the machine was busy (load average {load[0]:.1f} at start on {cpu['usable_cores']} cores): "
                     "timings are noisy")
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _fast_mode_section(impls: Mapping[str, Any], settings: Mapping[str, Any]) -> list[str]:
    """``--cache-interval``: fast mode beside the exact mode on each of our backends (p50s), with
    the image's difference from the exact mode's on the same backend."""
    fast = {k: v["fast_mode"] for k, v in impls.items() if v.get("fast_mode")}
    if not fast:
        return []
    theirs = diffusers_keys(impls)
    unet = "unet" if settings.get("controlnet") else "unet_plain"
    header = ["backend", "cache interval", "full UNet calls", "UNet call, full", "UNet call, shallow", "denoising loop",
              "loop × exact", "generation", "generation × exact"]
    header += [f"generation × {impls[d].get('label', d)}" for d in theirs]
    header += ["image vs exact: max", "mean", "PSNR"]
    lines = ["", "Fast mode (DeepCache step caching, branch 0; approximate) beside the exact mode on the same backend "
             "(p50s; × = speed-up; UNet call: the UNet graph alone, without the ControlNet):", "",
             "| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    for k, modes in fast.items():
        exact = impls[k]
        label = exact.get("label", k)

        def versus(generation: float) -> list[str]:
            return [f"{impls[d]['generation']['p50'] / generation:.2f}" if impls[d].get("generation") else "–"
                    for d in theirs]

        lines.append("| " + " | ".join([
            label, "1 (exact)", str(exact.get("unet_calls", "–")), _fmt(exact["stages"].get(unet, {}).get("p50"), "time"),
            "–", _fmt(exact["denoise_loop"]["p50"], "time"), "1.00", _fmt(exact["generation"]["p50"], "time"), "1.00",
            *versus(exact["generation"]["p50"]), "0", "0", "–"]) + " |")
        for interval, mode in modes.items():
            calls = mode["unet_call"]
            full = next((v for n, v in calls.items() if n.endswith("full_step")), {})
            shallow = next((v for n, v in calls.items() if n.startswith("unet") and n.endswith("shallow_step")), {})
            image = mode["image_vs_exact"]
            lines.append("| " + " | ".join([
                label, interval, str(mode["full_unet_calls"]), _fmt(full.get("p50"), "time"), _fmt(shallow.get("p50"), "time"),
                _fmt(mode["denoise_loop"]["p50"], "time"), f"{mode['speedup_vs_exact']['denoise_loop']:.2f}",
                _fmt(mode["generation"]["p50"], "time"), f"{mode['speedup_vs_exact']['generation']:.2f}",
                *versus(mode["generation"]["p50"]), f"{image['max_abs']:.3g}", f"{image['mean_abs']:.3g}",
                f"{image['psnr_db']:.1f} dB"]) + " |")
    return lines


def _edit_section(impls: Mapping[str, Any]) -> list[str]:
    """``--edit``: the edit against the generation, per denoising step and per UNet call (p50s)."""
    edits = {k: v["edit"]["comparison"] for k, v in impls.items() if "comparison" in v.get("edit", {})}
    if not edits:
        return []
    first = next(iter(edits.values()))
    unet = first["unet_call"]["generation_unet"]
    rows = first["unet_call"]["rows"]
    table = [
        ("denoising step, generation", lambda c: c["loop_per_step"]["generation"], "time"),
        ("denoising step, edit", lambda c: c["loop_per_step"]["edit"], "time"),
        ("edit / generation, per step", lambda c: c["loop_per_step"]["ratio"], "ratio"),
        (f"{unet} (1 call, {rows[unet]} rows)", lambda c: c["unet_call"][unet], "time"),
        (f"unet_p2p (1 call, {rows['unet_p2p']} rows)", lambda c: c["unet_call"]["unet_p2p"], "time"),
        (f"unet_p2p / {unet}, per call", lambda c: c["unet_call"]["ratio"], "ratio"),
        ("whole generation", lambda c: c["whole"]["generation"], "time"),
        ("whole edit (generated image)", lambda c: c["whole"]["edit"], "time"),
    ]
    lines = ["", "Editing (prompt-to-prompt on the generated image, the same latents, steps, scheduler and "
             "guidance; p50s):", "", "| | " + " | ".join(impls[k].get("label", k) for k in edits) + " |",
             "|---|" + "---:|" * len(edits)]
    for label, value, kind in table:
        cells = [f"{value(c):.2f}" if kind == "ratio" else _fmt(value(c), "time") for c in edits.values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "A denoising step is the loop's time over its UNet calls (the edit's includes the scheduler "
              "step of both latents and the local blend)."]
    return lines


def render_chart(results: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = results["table"]
    impls = results["implementations"]
    rows = [r for r in table["rows"] if r["kind"] == "time" and any(r["values"].values())]
    keys = [k for k in impls if any(r["values"].get(k) for r in rows)]
    fig, ax = plt.subplots(figsize=(10, 0.45 * max(1, len(rows)) * max(1, len(keys)) + 1.5))
    height = 0.8 / max(1, len(keys))
    for i, key in enumerate(keys):
        ys = [j + i * height for j in range(len(rows))]
        xs = [r["values"].get(key) or 0.0 for r in rows]
        p90 = [_p90(impls[key], r["key"]) for r in rows]
        errors = [[0.0] * len(rows), [max(0.0, (q or x) - x) for q, x in zip(p90, xs)]]
        ax.barh(ys, [x * 1e3 for x in xs], height=height, label=impls[key].get("label", key),
                xerr=[[e * 1e3 for e in errors[0]], [e * 1e3 for e in errors[1]]], capsize=2)
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(rows))])
    ax.set_yticklabels([r["label"] for r in rows])
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("latency, ms (log scale; bar: p50, whisker: p90)")
    s = results["settings"]
    ax.set_title(f"BLIP-Diffusion {s['height']}x{s['width']}, {s['steps']} steps, batch {s['batch']}, {s['precision']}")
    ax.legend(loc="lower right", fontsize="small")
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _p90(impl: Mapping[str, Any], key: str) -> float | None:
    stat = impl.get("stages", {}).get(key) if key in COMPONENT_STAGES or key == "scheduler_step" else impl.get(key)
    return stat.get("p90") if isinstance(stat, dict) else None


def write_json(path: Path, data: Any) -> None:
    """``data`` as JSON, atomically (temporary file, then rename): a run stopped while writing, or
    killed at its time limit, leaves the previous complete file, never half of one. numpy values
    are written as numbers and lists."""
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default))
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
    except ImportError:
        pass
    return str(value)
