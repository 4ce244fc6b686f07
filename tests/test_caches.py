"""The caches a backend fills while it runs (docs/caches.md): OpenVINO's model cache (IR and compiled
blobs) and ONNX Runtime's optimised-graph cache, used by several processes at once, killed writers,
full disks, and entries that are files or symlinks leading out of the cache.

The concurrency test runs real processes (no mocks): several generations started at the same
moment on one empty cache, a few rounds, each bounded in time.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from blipdiffusion_trt.package import ModelPackage, read_pipeline_config

from helpers import REPO

openvino = pytest.importorskip("openvino", reason="the OpenVINO cache tests need OpenVINO (pip install .[openvino])")

from blipdiffusion_trt.runtime.backends import openvino as ove  # noqa: E402
from blipdiffusion_trt.runtime.backends.openvino import OpenVINOOptions, make_openvino_engine  # noqa: E402

pytestmark = pytest.mark.slow

PROCESSES = 4
ROUNDS = 3
# one generation of the tiny fixture, compiles included, takes seconds; a hung or crashed
# process must not hold the suite
PROCESS_TIMEOUT_S = 240

GENERATION = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import numpy as np
    from blipdiffusion_trt.runtime.backends.openvino import OpenVINOOptions
    from blipdiffusion_trt.runtime.pipeline import BlipDiffusionRuntime

    package, cache, inputs, out, start = sys.argv[1:6]
    while not Path(start).exists():  # every process starts filling the cache at the same moment
        time.sleep(0.002)
    feed = np.load(inputs)
    options = OpenVINOOptions(cache_dir=cache, inference_precision="f32", threads=1)
    with BlipDiffusionRuntime.from_package(package, "openvino", options=options) as runtime:
        image = runtime("on a sofa", feed["reference"], "dog", "dog", latents=feed["latents"],
                        num_inference_steps=2, output_type="np").images
    np.save(out, image)
    """
)


def _generation_inputs(package: Path, path: Path) -> Path:
    config = read_pipeline_config(package)
    rng = np.random.default_rng(11)
    latents = rng.standard_normal((1, config.latent_channels, config.default_height // config.latent_scale_factor,
                                   config.default_width // config.latent_scale_factor)).astype(np.float32)
    np.savez(path, latents=latents, reference=rng.integers(0, 256, (24, 20, 3), dtype=np.uint8))
    return path


def _start_generations(package: Path, cache: Path, inputs: Path, outputs: list[Path], start: Path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return [subprocess.Popen([sys.executable, "-c", GENERATION, str(package), str(cache), str(inputs), str(out),
                              str(start)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for out in outputs]


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        output, _ = proc.communicate(timeout=PROCESS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        return -signal.SIGKILL, f"timed out after {PROCESS_TIMEOUT_S} s\n{output}"
    return proc.returncode, output


def test_processes_filling_one_openvino_cache_all_succeed(tiny, tmp_path):
    """Several generations on one empty cache at the same moment (two CLI runs, two servers
    starting): every one succeeds with the image an uncached run gives, and the cache is left
    complete (IR recorded, no partial folders) and serves the next process."""
    inputs = _generation_inputs(tiny.package, tmp_path / "inputs.npz")
    failures = []
    images = []
    for round_ in range(ROUNDS):
        cache = tmp_path / f"cache-{round_}"
        start = tmp_path / f"start-{round_}"
        outputs = [tmp_path / f"image-{round_}-{i}.npy" for i in range(PROCESSES)]
        procs = _start_generations(tiny.package, cache, inputs, outputs, start)
        time.sleep(3)  # let them import; then all open the cache together
        start.touch()
        for i, proc in enumerate(procs):
            code, output = _finish(proc)
            if code != 0:
                failures.append(f"round {round_} process {i}: exit {code}\n{output[-2000:]}")
            else:
                images.append(np.load(outputs[i]))
        entries = [p for p in cache.iterdir() if not p.name.startswith(".")]
        assert entries, "nothing was cached"
        leftovers = sorted(str(p.relative_to(cache)) for p in cache.rglob("*partial*"))
        assert not leftovers, leftovers
        for entry in entries:
            assert {ove.IR_XML, ove.IR_BIN, ove.IR_RECORD} <= {p.name for p in entry.iterdir()}, entry
    assert not failures, "\n\n".join(failures)
    assert len(images) == PROCESSES * ROUNDS
    for image in images[1:]:
        np.testing.assert_array_equal(image, images[0])


# ---------------------------------------------------------------------------------------------
# A writer killed while it writes: its leftovers are removed by the next run
# ---------------------------------------------------------------------------------------------

KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import openvino
    from blipdiffusion_trt.package import ModelPackage
    from blipdiffusion_trt.runtime.backends.openvino import OpenVINOOptions, make_openvino_engine

    package, cache, written = sys.argv[1:4]
    save_model = openvino.save_model

    def save_and_stall(model, path, **kwargs):  # the IR is on disk, not yet published: kill -9 comes here
        save_model(model, path, **kwargs)
        Path(written).write_text(path)
        time.sleep(600)

    openvino.save_model = save_and_stall
    make_openvino_engine(ModelPackage.open(package), "vae_decoder", "fp32",
                         OpenVINOOptions(cache_dir=cache, inference_precision="f32"))
    """
)


def _vae_feed(package) -> dict[str, np.ndarray]:
    spec = package.specs["vae_decoder"]
    config = read_pipeline_config(package.root)
    point = {"batch": 1, "latent_height": config.default_height // config.latent_scale_factor,
             "latent_width": config.default_width // config.latent_scale_factor}
    return {t.name: np.random.default_rng(5).standard_normal(t.shape_at(point)).astype(np.float32) for t in spec.inputs}


def test_killed_ir_writer_leaves_nothing_behind(tiny, tmp_path, caplog):
    """kill -9 while the IR is written (holding the entry's lock) leaves a staging folder with part
    of an entry; the next process is not blocked by the dead writer's lock, removes its leftovers
    and publishes a complete entry."""
    cache, written = tmp_path / "cache", tmp_path / "written"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tiny.package), str(cache), str(written)],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + PROCESS_TIMEOUT_S
        while not written.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert written.exists(), proc.communicate(timeout=10)[0] if proc.poll() is not None else "never wrote the IR"
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert Path(written.read_text()).exists(), "the killed writer's IR is gone already"
    leftovers = [p for p in cache.rglob("*partial*")]
    assert leftovers, sorted(cache.rglob("*"))

    package = ModelPackage.open(tiny.package)
    with caplog.at_level(logging.INFO):
        engine = make_openvino_engine(package, "vae_decoder", "fp32", OpenVINOOptions(cache_dir=cache, inference_precision="f32"))
    assert engine.model_source == "onnx, cached as ir"
    assert not [p for p in cache.rglob("*partial*")], sorted(cache.rglob("*"))
    assert any("left by an interrupted run" in r.getMessage() for r in caplog.records), caplog.text
    engine.infer(_vae_feed(package))
    again = make_openvino_engine(package, "vae_decoder", "fp32", OpenVINOOptions(cache_dir=cache, inference_precision="f32"))
    assert again.model_source == "ir cache"


# ---------------------------------------------------------------------------------------------
# Entries that are files, or symlinks leading out of the cache
# ---------------------------------------------------------------------------------------------

def _entry(package: ModelPackage, cache: Path, component: str = "vae_decoder") -> Path:
    return cache / f"{component}-{package.graph_content_sha256(component, 'fp32')[:16]}"


def test_openvino_entry_that_is_a_file_is_replaced(tiny, tmp_path, caplog):
    package = ModelPackage.open(tiny.package)
    cache = tmp_path / "cache"
    cache.mkdir()
    entry = _entry(package, cache)
    entry.write_text("not a cache entry")
    with caplog.at_level(logging.WARNING):
        engine = make_openvino_engine(package, "vae_decoder", "fp32", OpenVINOOptions(cache_dir=cache, inference_precision="f32"))
    assert f"cache entry {entry} is not a directory" in caplog.text, caplog.text
    assert "File exists" not in caplog.text
    assert engine.model_source == "onnx, cached as ir" and entry.is_dir()
    engine.infer(_vae_feed(package))
    assert any(p.suffix == ".blob" for p in entry.iterdir())


def test_openvino_entry_symlinked_out_of_the_cache_is_not_written_through(tiny, tmp_path, caplog):
    """An entry (or a blob in it) that is a symlink leading outside the cache folder is neither
    read nor written through: the link is replaced by a real entry, the outside folder untouched."""
    package = ModelPackage.open(tiny.package)
    cache, outside = tmp_path / "cache", tmp_path / "outside"
    cache.mkdir()
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    entry = _entry(package, cache)
    entry.symlink_to(outside, target_is_directory=True)
    with caplog.at_level(logging.WARNING):
        engine = make_openvino_engine(package, "vae_decoder", "fp32", OpenVINOOptions(cache_dir=cache, inference_precision="f32"))
    assert "leads outside the cache" in caplog.text and str(entry) in caplog.text, caplog.text
    feed = _vae_feed(package)
    expected = engine.infer(feed)["image"]
    assert entry.is_dir() and not entry.is_symlink()
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]

    # a blob replaced by a symlink out of the cache: removed before OpenVINO opens the folder
    blob = next(p for p in entry.iterdir() if p.suffix == ".blob")
    (outside / blob.name).write_bytes(b"outside")
    blob.unlink()
    blob.symlink_to(outside / blob.name)
    again = make_openvino_engine(package, "vae_decoder", "fp32", OpenVINOOptions(cache_dir=cache, inference_precision="f32"))
    np.testing.assert_array_equal(again.infer(feed)["image"], expected)
    assert (outside / blob.name).read_bytes() == b"outside"
    assert blob.is_file() and not blob.is_symlink()



# ---------------------------------------------------------------------------------------------
# Waiting is bounded; a cache fault names the cache, not the graph
# ---------------------------------------------------------------------------------------------

def test_openvino_cache_held_too_long_runs_uncached(tiny, tmp_path, monkeypatch, caplog):
    """Another holder of the entry's lock (here this process, through another descriptor) past
    the bounded wait: a warning naming the cache, and the graph runs uncached."""
    from blipdiffusion_trt.fsutil import locked

    package = ModelPackage.open(tiny.package)
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setattr(ove, "CACHE_LOCK_TIMEOUT_S", 0.5)
    entry = _entry(package, cache)
    with locked(entry.with_name(f".{entry.name}.lock")):
        with caplog.at_level(logging.WARNING):
            engine = make_openvino_engine(package, "vae_decoder", "fp32",
                                          OpenVINOOptions(cache_dir=cache, inference_precision="f32"))
            image = engine.infer(_vae_feed(package))["image"]
    assert engine.model_source == "onnx" and engine.loaded_from_cache is False and not entry.exists()
    assert f"without the model cache {cache}" in caplog.text and "more than 0.5 s" in caplog.text, caplog.text
    uncached = make_openvino_engine(package, "vae_decoder", "fp32", OpenVINOOptions(model_cache=False, inference_precision="f32"))
    np.testing.assert_array_equal(image, uncached.infer(_vae_feed(package))["image"])


def test_truncated_blob_is_compiled_again(tiny, tmp_path):
    """A blob cut short (its writer killed, a full disk) is not served: compiled and written again."""
    package = ModelPackage.open(tiny.package)
    cache = tmp_path / "cache"
    options = OpenVINOOptions(cache_dir=cache, inference_precision="f32")
    feed = _vae_feed(package)
    expected = make_openvino_engine(package, "vae_decoder", "fp32", options).infer(feed)["image"]
    blob = next(p for p in _entry(package, cache).iterdir() if p.suffix == ".blob")
    size = blob.stat().st_size
    blob.write_bytes(blob.read_bytes()[: size // 2])
    engine = make_openvino_engine(package, "vae_decoder", "fp32", options)
    np.testing.assert_array_equal(engine.infer(feed)["image"], expected)
    assert engine.loaded_from_cache is False and blob.stat().st_size > size // 2
    # written whole again (its size varies a little between compilations): the next process loads it
    again = make_openvino_engine(package, "vae_decoder", "fp32", options)
    np.testing.assert_array_equal(again.infer(feed)["image"], expected)
    # (OpenVINO 2025.0 hashes a graph read twice in one process differently, and compiles it again)
    assert again.loaded_from_cache or openvino.__version__ < "2026"


def test_compilation_failing_with_the_cache_names_the_cache(tiny, tmp_path, monkeypatch, caplog):
    """A compilation that fails only with CACHE_DIR (stand-in: OpenVINO's Core raising when given
    it, as on a blob it cannot write) is retried without the cache; the warning names the cache
    entry, and no error blames the package's graph."""
    core = ove.openvino_core()

    class CacheFailingCore:
        def __getattr__(self, name):
            return getattr(core, name)

        def compile_model(self, model, device, config):
            if "CACHE_DIR" in config:
                raise RuntimeError(f"Exception from core.cpp\ncannot set permissions {config['CACHE_DIR']}/x.blob")
            return core.compile_model(model, device, config)

    package = ModelPackage.open(tiny.package)
    cache = tmp_path / "cache"
    monkeypatch.setattr(ove, "openvino_core", lambda: CacheFailingCore())
    with caplog.at_level(logging.WARNING):
        engine = make_openvino_engine(package, "vae_decoder", "fp32", OpenVINOOptions(cache_dir=cache, inference_precision="f32"))
        image = engine.infer(_vae_feed(package))["image"]
    entry = _entry(package, cache)
    assert f"model cache {entry} failed for vae_decoder" in caplog.text, caplog.text
    assert engine.loaded_from_cache is False and np.isfinite(image).all()


# ---------------------------------------------------------------------------------------------
# ONNX Runtime's optimised-graph cache: full disk, unwritable folder, symlinked entry files
# ---------------------------------------------------------------------------------------------

FULL_DISK = textwrap.dedent(
    """
    import resource, signal, sys
    import numpy as np
    from blipdiffusion_trt.runtime.pipeline import BlipDiffusionRuntime

    package, cache, inputs, out, limit = sys.argv[1:6]
    feed = np.load(inputs)
    # Every file this process writes stops at `limit` bytes (EFBIG), as on a disk that is full:
    # ONNX Runtime's optimised graphs are larger. Lifted again to write the image.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), hard))
    runtime = BlipDiffusionRuntime.from_package(package, optimized_cache=cache)
    image = runtime("on a sofa", feed["reference"], "dog", "dog", latents=feed["latents"],
                    num_inference_steps=2, output_type="np").images
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    np.save(out, image)
    """
)
FULL_DISK_LIMIT = 64 << 10  # bytes; the tiny fixture's smallest graph is several times larger


def _uncached_image(package: Path, inputs: Path) -> np.ndarray:
    from blipdiffusion_trt.runtime.pipeline import BlipDiffusionRuntime

    feed = np.load(inputs)
    with BlipDiffusionRuntime.from_package(package) as runtime:
        return runtime("on a sofa", feed["reference"], "dog", "dog", latents=feed["latents"],
                       num_inference_steps=2, output_type="np").images


def test_ort_cache_on_a_full_disk_warns_and_runs_uncached(tiny, tmp_path):
    """Writes into the cache fail (EFBIG from a file-size limit, as ENOSPC from a full disk): the
    generation succeeds with the uncached image, and the warning names the cache, not the graph."""
    smallest = min(p.stat().st_size for p in (tiny.package / "onnx").rglob("*.onnx"))
    assert smallest > 2 * FULL_DISK_LIMIT, f"a graph of {smallest} bytes fits under the limit"
    inputs = _generation_inputs(tiny.package, tmp_path / "inputs.npz")
    cache, out = tmp_path / "ort-cache", tmp_path / "image.npy"
    proc = subprocess.run([sys.executable, "-c", FULL_DISK, str(tiny.package), str(cache), str(inputs), str(out),
                           str(FULL_DISK_LIMIT)], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"optimized_cache {cache}" in proc.stderr and "not cached" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    np.testing.assert_array_equal(np.load(out), _uncached_image(tiny.package, inputs))
    assert not list(cache.glob("*.json")), "a record vouches for a file the full disk cut short"
    assert not list(cache.glob(".*partial*"))


def test_ort_cache_that_cannot_be_written_warns_and_runs_uncached(tiny, tmp_path, caplog):
    from blipdiffusion_trt.runtime.pipeline import BlipDiffusionRuntime

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for cache in (blocker, blocker / "cache"):  # a file where the folder should be; a folder under a file
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            runtime = BlipDiffusionRuntime.from_package(tiny.package, optimized_cache=cache)
        assert all(e.loaded_from.is_relative_to(tiny.package) for e in runtime.engines.values())
        assert f"optimized_cache {cache}" in caplog.text and "not writable" in caplog.text, caplog.text
        runtime.close()


def test_ort_cache_entry_symlinked_out_of_the_cache_is_not_followed(tiny, tmp_path, caplog):
    """An entry's file replaced by a symlink leading outside the cache is neither read nor written
    through: the entry is rebuilt with plain files, and the file outside is untouched."""
    from blipdiffusion_trt.runtime.pipeline import BlipDiffusionRuntime

    cache, outside = tmp_path / "cache", tmp_path / "outside"
    outside.mkdir()
    with BlipDiffusionRuntime.from_package(tiny.package, optimized_cache=cache) as runtime:
        graph = runtime.engines["vae_decoder"].loaded_from
    record = graph.with_suffix(".json")
    for path in (record, graph):
        moved = outside / path.name
        os.replace(path, moved)  # a valid file, so only the confinement can refuse it
        path.symlink_to(moved)
    before = {p.name: p.read_bytes() for p in outside.iterdir()}
    with caplog.at_level(logging.WARNING):
        with BlipDiffusionRuntime.from_package(tiny.package, optimized_cache=cache) as runtime:
            assert runtime.engines["vae_decoder"].loaded_from == graph
    assert "leads outside the cache" in caplog.text and "rebuilding" in caplog.text, caplog.text
    assert not record.is_symlink() and not graph.is_symlink() and record.is_file() and graph.is_file()
    assert {p.name: p.read_bytes() for p in outside.iterdir()} == before
