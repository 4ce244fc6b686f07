"""A liveness probe for a served ``blip_diffusion`` model: one real, tiny generation.

Triton's health endpoints do not see a dead python-backend stub: after ``kill -9`` of one
component's stub (or the pipeline's own), ``/v2/health/ready`` and the models' ready endpoints
keep answering 200/READY while every request fails (Triton 2.51's python backend neither
restarts the stub nor marks the model unready). A load balancer must therefore probe with a real
request. This one runs every component a generation uses, at the smallest size the package
declares, with one step:

- a random reference image and a random negative prompt, so that the model's subject and
  negative-prompt caches cannot answer for the Q-Former and the plain text encoder;
- guidance 2 (the UNet runs on [negative; positive]), and a random control image for a
  ControlNet package (the model's ``has_controlnet`` parameter says which).

``python -m blipdiffusion_trt.serving.triton.probe --url HOST:PORT [--model NAME]`` (or
``blipdiffusion-trt triton-probe``) exits 0 when an image of the requested size comes back, 1
with one line saying what failed otherwise. Standard library only (HTTP/REST, KServe v2
protocol), so it runs in Triton's container from the repository's copy of this code.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import sys
import time
import urllib.error
import urllib.request
from typing import Any

DEFAULT_TIMEOUT = 60.0
SUBJECT_IMAGE_SIDE = 16  # the model resizes the reference image to its own size anyway


MAX_REASON_CHARS = 200


class ProbeFailed(Exception):
    """The served model did not produce an image (one line: why)."""


def printable(text: object) -> str:
    """One line of printable text, at most :data:`MAX_REASON_CHARS`: what a server that is not
    Triton's HTTP endpoint (a gRPC port's binary frames) answered, made safe for a log."""
    line = " ".join("".join(c if c.isprintable() else " " for c in str(text)).split())
    if len(line) > MAX_REASON_CHARS:
        line = line[:MAX_REASON_CHARS] + "..."
    return line


def _base_url(url: str) -> str:
    return url.rstrip("/") if "://" in url else f"http://{url.rstrip('/')}"


def _request(url: str, body: bytes | None, timeout: float) -> Any:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"},
                                     method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = json.loads(response.read())
        if not isinstance(answer, dict):
            raise ValueError(f"expected a JSON object, got {type(answer).__name__}")
        return answer
    except urllib.error.HTTPError as error:
        try:
            message = json.loads(error.read()).get("error", "")
        except (ValueError, OSError):
            message = ""
        raise ProbeFailed(f"HTTP {error.code}: {printable(message) or printable(error.reason)}") from None
    except http.client.HTTPException as error:  # not an HTTP/1.1 server (a gRPC port answers with binary frames)
        raise ProbeFailed(f"no HTTP answer from {url} (is it Triton's HTTP port?): {type(error).__name__}: "
                          f"{printable(error)}") from None
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise ProbeFailed(f"no answer from {url}: {printable(reason)}") from None


def _parameters(config: dict[str, Any]) -> dict[str, str]:
    return {k: (v or {}).get("string_value", "") for k, v in (config.get("parameters") or {}).items()}


def probe_request(parameters: dict[str, str], rng: random.Random) -> tuple[dict[str, Any], tuple[int, int]]:
    """The inference request body (KServe v2 JSON) of one tiny generation, and the image size expected."""
    side = int(parameters.get("min_image_size") or 64)
    image = [rng.randrange(256) for _ in range(SUBJECT_IMAGE_SIDE * SUBJECT_IMAGE_SIDE * 3)]

    def tensor(name: str, datatype: str, shape: list[int], data: list) -> dict[str, Any]:
        return {"name": name, "datatype": datatype, "shape": shape, "data": data}

    inputs = [
        tensor("prompt", "BYTES", [1], ["a photo"]),
        tensor("reference_image", "UINT8", [SUBJECT_IMAGE_SIDE, SUBJECT_IMAGE_SIDE, 3], image),
        tensor("source_subject", "BYTES", [1], ["dog"]),
        tensor("target_subject", "BYTES", [1], ["dog"]),
        tensor("steps", "INT32", [1], [1]),
        tensor("guidance_scale", "FP32", [1], [2.0]),
        tensor("seed", "INT64", [1], [rng.randrange(1 << 31)]),
        tensor("height", "INT32", [1], [side]),
        tensor("width", "INT32", [1], [side]),
        tensor("negative_prompt", "BYTES", [1], [f"probe {rng.getrandbits(64):016x}"]),
    ]
    if parameters.get("has_controlnet") == "true":
        inputs.append(tensor("condition_image", "UINT8", [side, side, 3],
                             [rng.randrange(256) for _ in range(side * side * 3)]))
    return {"inputs": inputs, "outputs": [{"name": "image"}]}, (side, side)


def probe(url: str, model: str = "blip_diffusion", *, timeout: float = DEFAULT_TIMEOUT) -> float:
    """One tiny generation on ``model`` at ``url``; its seconds, or :class:`ProbeFailed`."""
    base = f"{_base_url(url)}/v2/models/{model}"
    start = time.monotonic()
    config = _request(f"{base}/config", None, timeout)
    body, (height, width) = probe_request(_parameters(config), random.Random())
    result = _request(f"{base}/infer", json.dumps(body).encode(), timeout)
    outputs = {o.get("name"): o for o in result.get("outputs") or []}
    image = outputs.get("image")
    if image is None or list(image.get("shape") or []) != [height, width, 3]:
        raise ProbeFailed(f"model {model}: no {height}x{width} image in the answer")
    return time.monotonic() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="blipdiffusion-trt triton-probe", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_probe(parser.parse_args(argv))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="127.0.0.1:8000", help="the server's HTTP address (default 127.0.0.1:8000)")
    p.add_argument("--model", default="blip_diffusion", help="the pipeline model (default blip_diffusion)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help=f"seconds per HTTP call (default {DEFAULT_TIMEOUT:g})")


def run_probe(args: argparse.Namespace) -> int:
    """Exit status 0: an image came back; 1: it did not (one line on stderr)."""
    try:
        seconds = probe(args.url, args.model, timeout=args.timeout)
    except ProbeFailed as error:
        print(f"unhealthy: {printable(error)}", file=sys.stderr)
        return 1
    print(f"ok: {args.model} made an image in {seconds:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
