"""Triton under load (issue 23.6): a real server, 127.0.0.1 only, bounded in count and time.

One repository of the tiny package with a small queue (``--max-queue-size 2``, one instance: at
most 3 requests held) and clients at 3x that: every request gets an image or a clean rejection
within its timeout; accepted images equal the Python API's for the same seed; a cancelled request
stops within one denoising step of the cancel reaching the server and the instance serves the next one; a request's own timeout
stops it; the model's counters equal what the clients saw; the resident memory of the server and
its stubs stays flat over 200 requests; ``kill -9`` of the pipeline model's stub under load makes
the probe fail, no client hangs, and the restarted server serves again.
"""

from __future__ import annotations

import concurrent.futures
import os
import queue
import re
import signal
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc", reason="needs the triton extra (pip install .[triton])")

from helpers import run_cli  # noqa: E402
from triton_server import infer_inputs, start_server, stop_server, stub_pid  # noqa: E402

from blipdiffusion_trt.package import read_pipeline_config  # noqa: E402
from blipdiffusion_trt.serving.triton import repository as tr  # noqa: E402

MAX_QUEUE_SIZE = 2
CLIENTS = 3 * (MAX_QUEUE_SIZE + 1)  # 3x what the server holds: one running, MAX_QUEUE_SIZE waiting
REQUESTS = 200
SEEDS = (0, 1, 2)
SIDE = 32
CLIENT_TIMEOUT = 120.0  # seconds: a guard against a hung server, not a speed requirement
# Resident memory of the server and its stubs may grow this much from request 40 to request 200
# (allocator pools settling), not with the request count: a leak of one 32x32 generation's
# tensors per request would pass 160 x ~1 MB.
RSS_GROWTH_BOUND = 64 << 20
REFERENCE = np.random.default_rng(7).integers(0, 256, (40, 50, 3), dtype=np.uint8)


def arrays(seed: int = 0, steps: int = 2, **raw) -> dict[str, np.ndarray]:
    values = {
        "prompt": np.array([b"a photo in the snow"], dtype=np.object_),
        "reference_image": REFERENCE,
        "source_subject": np.array([b"dog"], dtype=np.object_),
        "target_subject": np.array([b"dog"], dtype=np.object_),
        "steps": np.array([steps], np.int32),
        "guidance_scale": np.array([7.5], np.float32),
        "seed": np.array([seed], np.int64),
        "height": np.array([SIDE], np.int32),
        "width": np.array([SIDE], np.int32),
        "scheduler": np.array([b"ddim"], dtype=np.object_),
    }
    values.update(raw)
    return values


def grpc_inputs(values: dict[str, np.ndarray]) -> list:
    import tritonclient.grpc as grpc

    return infer_inputs(grpc, values)


def reference(package: Path, seed: int) -> np.ndarray:
    from blipdiffusion_trt.runtime.pipeline import BlipDiffusionRuntime

    runtime = BlipDiffusionRuntime.from_package(package)
    try:
        image = runtime("a photo in the snow", REFERENCE, "dog", "dog", num_inference_steps=2, guidance_scale=7.5,
                        seed=seed, height=SIDE, width=SIDE, scheduler="ddim", output_type="np").images[0]
    finally:
        runtime.close()
    return (image * 255).round().astype(np.uint8)


def metrics(server) -> dict[str, float]:
    """This server's blip_diffusion_* series: 'name{labels}' -> value."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    found = {}
    for line in text.splitlines():
        if line.startswith("blip_diffusion_"):
            key, value = line.rsplit(" ", 1)
            found[key] = float(value)
    return found


def counter(values: dict[str, float], name: str, **labels: str) -> float:
    key = name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
    return values.get(key, 0.0)


def group_rss(server) -> int:
    """Resident bytes of the server and every process of its session (its stubs)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) != server.process.pid:
                continue
            status = (entry / "status").read_text()
        except (OSError, ProcessLookupError):
            continue
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        total += int(match.group(1)) * 1024 if match else 0
    return total


@pytest.fixture(scope="module")
def loaded_server(tiny, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("triton-load")
    repo = tr.write_triton_repository(tiny.package, tmp / "repo", "python-cpu", max_queue_size=MAX_QUEUE_SIZE).path
    server = start_server([repo], tmp)
    yield server, repo, tmp
    stop_server(server)


def test_triton_under_load(loaded_server, tiny):
    import tritonclient.grpc as grpc
    from tritonclient.utils import InferenceServerException

    server, repo, tmp = loaded_server
    expected = {seed: reference(tiny.package, seed) for seed in SEEDS}
    seen = {"ok": 0, "invalid": 0, "rejected": 0, "wrong": [], "other": []}
    lock = threading.Lock()
    counter_lock = threading.Lock()
    issued = [0]
    rss = {}

    def next_index() -> int | None:
        with counter_lock:
            if issued[0] >= REQUESTS:
                return None
            issued[0] += 1
            return issued[0]

    def client_loop(_: int) -> None:
        client = grpc.InferenceServerClient(server.grpc_url)
        try:
            while (index := next_index()) is not None:
                if index == 40:
                    rss["after 40"] = group_rss(server)
                seed = SEEDS[index % len(SEEDS)]
                invalid = index % 10 == 0
                values = arrays(seed, steps=0 if invalid else 2)
                start = time.monotonic()
                try:
                    result = client.infer("blip_diffusion", grpc_inputs(values), client_timeout=CLIENT_TIMEOUT)
                    outcome = "ok"
                    good = np.array_equal(result.as_numpy("image"), expected[seed])
                except InferenceServerException as error:
                    message, status = error.message(), str(error.status())
                    assert "\n" not in message and "Traceback" not in message, message
                    if invalid and status == "StatusCode.INVALID_ARGUMENT" and "num_inference_steps" in message:
                        outcome = "invalid"
                    elif status == "StatusCode.UNAVAILABLE" and "Exceeds maximum queue size" in message:
                        outcome = "rejected"  # Triton's own error, before the model
                    else:
                        outcome = f"{status}: {message}"
                    good = True
                assert time.monotonic() - start < CLIENT_TIMEOUT
                with lock:
                    if outcome in seen:
                        seen[outcome] += 1
                    else:
                        seen["other"].append(outcome)
                    if not good:
                        seen["wrong"].append(seed)
        finally:
            client.close()

    before = metrics(server)
    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(client_loop, range(CLIENTS), timeout=REQUESTS * CLIENT_TIMEOUT))
    rss["after 200"] = group_rss(server)
    assert not seen["other"], seen["other"][:5]
    assert not seen["wrong"], f"{len(seen['wrong'])} images differ from the Python API's"
    assert seen["ok"] + seen["invalid"] + seen["rejected"] == REQUESTS
    assert seen["rejected"] > 0, "3x the queue's capacity and nothing was rejected: is the queue bounded?"
    assert seen["ok"] > 0
    after = metrics(server)
    for outcome in ("ok", "invalid"):
        got = counter(after, "blip_diffusion_requests_total", model="blip_diffusion", outcome=outcome) - \
            counter(before, "blip_diffusion_requests_total", model="blip_diffusion", outcome=outcome)
        assert got == seen[outcome], (outcome, got, seen)
    steps = counter(after, "blip_diffusion_denoising_steps_total", model="blip_diffusion") - \
        counter(before, "blip_diffusion_denoising_steps_total", model="blip_diffusion")
    assert steps == 2 * seen["ok"]
    assert rss["after 200"] - rss["after 40"] < RSS_GROWTH_BOUND, rss

    # A cancelled request stops within one step of the cancel; the instance then serves normally.
    def steps_done() -> float:
        return counter(metrics(server), "blip_diffusion_denoising_steps_total", model="blip_diffusion")

    client = grpc.InferenceServerClient(server.grpc_url)
    try:
        base = metrics(server)
        answers: queue.Queue = queue.Queue()
        # the largest image the package takes: long steps next to the cancel's delivery
        side = read_pipeline_config(tiny.package).max_image_size
        big = {"height": np.array([side], np.int32), "width": np.array([side], np.int32)}
        context = client.async_infer("blip_diffusion", grpc_inputs(arrays(5, steps=1000, **big)),
                                     callback=lambda result, error: answers.put(error))
        deadline = time.monotonic() + CLIENT_TIMEOUT
        start_steps = counter(base, "blip_diffusion_denoising_steps_total", model="blip_diffusion")
        while steps_done() < start_steps + 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        at_cancel = steps_done()
        context.cancel()
        assert "CANCELLED" in str(answers.get(timeout=30))
        cancelled_key = dict(model="blip_diffusion", outcome="cancelled")
        while counter(metrics(server), "blip_diffusion_requests_total", **cancelled_key) == \
                counter(base, "blip_diffusion_requests_total", **cancelled_key):
            assert time.monotonic() < deadline, "the server never stopped the cancelled request"
            time.sleep(0.05)
        # The model checks after every step, so it stops at the first check after the cancel
        # reached it: the step running when the client cancelled finishes, and at most one more
        # (begun while the cancel was in transit: client, gRPC, Triton's core) does.
        assert steps_done() - at_cancel <= 2, (at_cancel, steps_done())
        result = client.infer("blip_diffusion", grpc_inputs(arrays(1)), client_timeout=CLIENT_TIMEOUT)
        np.testing.assert_array_equal(result.as_numpy("image"), expected[1])

        # A request's own timeout (microseconds) stops it between steps, with UNAVAILABLE.
        with pytest.raises(InferenceServerException) as error:
            client.infer("blip_diffusion", grpc_inputs(arrays(6, steps=1000)), timeout=300_000,
                         client_timeout=CLIENT_TIMEOUT)
        assert str(error.value.status()) == "StatusCode.UNAVAILABLE"
        assert error.value.message().startswith("timed out: its timeout of 300 ms passed after ")
        final = metrics(server)
        assert counter(final, "blip_diffusion_requests_total", model="blip_diffusion", outcome="timed_out") == 1
        assert counter(final, "blip_diffusion_requests_total", **cancelled_key) == 1
        assert counter(final, "blip_diffusion_requests_total", model="blip_diffusion", outcome="failed") == 0
    finally:
        client.close()

    # kill -9 of the pipeline model's stub under load: no client hangs, the probe fails, a
    # restarted server serves again.
    outcomes: list[str] = []

    def busy_client(index: int) -> None:
        c = grpc.InferenceServerClient(server.grpc_url)
        try:
            for k in range(4):
                try:
                    c.infer("blip_diffusion", grpc_inputs(arrays(k, steps=20)), client_timeout=30.0)
                    outcomes.append("ok")
                except InferenceServerException as error:
                    outcomes.append(str(error.status()))
        finally:
            c.close()

    threads = [threading.Thread(target=busy_client, args=(i,), daemon=True) for i in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    os.kill(stub_pid(server, "blip_diffusion"), signal.SIGKILL)
    for thread in threads:
        thread.join(timeout=4 * 30.0 + 10)
        assert not thread.is_alive(), "a client hung after the stub was killed"
    assert len(outcomes) == 12
    probe = run_cli("triton-probe", "--url", server.http_url, "--timeout", "60", timeout=120)
    assert probe.returncode == 1 and probe.stderr.startswith("unhealthy: "), probe
    stop_server(server)
    (tmp / "restarted").mkdir()
    restarted = start_server([repo], tmp / "restarted")
    try:
        probe = run_cli("triton-probe", "--url", restarted.http_url, "--timeout", "60", timeout=120)
        assert probe.returncode == 0, probe
    finally:
        stop_server(restarted)
