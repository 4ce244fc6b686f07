"""A Triton model repository's python models, run in this process on the fake
``triton_python_backend_utils`` (its in-process server), as Triton 2.51's python backend runs them.

:func:`load_python_models` initialises every python-backend model of a repository from its
``1/model.py`` with the arguments Triton passes (the config as Triton's JSON); BLS requests
between them go through the fake's :func:`~triton_python_backend_utils.serve` registry.

Run as a script (``python -S triton_repository.py REPOSITORY REQUEST.npz RESULT.json``), it does
one generation with nothing but the repository's own copy of ``blipdiffusion_trt`` importable
(``-S``: no site-packages ``.pth`` files, so no installed or editable copy; third-party packages
come from ``PYTHONPATH``), and writes the image and the files of every ``blipdiffusion_trt``
module that was loaded.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any


def model_config_json(config_pbtxt: Path) -> str:
    """A config.pbtxt as the JSON Triton hands to ``initialize`` (proto field names)."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(config_pbtxt.read_text(), model_config_pb2.ModelConfig())
    return json_format.MessageToJson(config, preserving_proto_field_name=True)


def load_python_models(repository: Path, backend_utils: Any) -> dict[str, Any]:
    """name -> initialised ``TritonPythonModel`` of every python-backend model, each served by the fake."""
    models = {}
    for model_dir in sorted(p for p in Path(repository).iterdir() if (p / "config.pbtxt").is_file()):
        text = model_config_json(model_dir / "config.pbtxt")
        config = json.loads(text)
        if config.get("backend") != "python":
            continue
        name = config["name"]
        spec = importlib.util.spec_from_file_location(f"triton_model_{name}", model_dir / "1" / "model.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        model = module.TritonPythonModel()
        model.initialize({
            "model_config": text, "model_name": name, "model_version": "1", "model_repository": str(model_dir),
            "model_instance_kind": "CPU", "model_instance_name": f"{name}_0", "model_instance_device_id": "0",
        })
        backend_utils.serve(name, model)
        models[name] = model
    return models


def request(backend_utils: Any, arrays: dict[str, Any]) -> Any:
    """A client's request as the model receives it: strings as object arrays of bytes."""
    import numpy as np

    tensors = []
    for name, array in arrays.items():
        array = np.asarray(array)
        if array.dtype.kind in "US":
            array = np.array([s.encode() if isinstance(s, str) else bytes(s) for s in array.reshape(-1)],
                             dtype=np.object_).reshape(array.shape)
        tensors.append(backend_utils.Tensor(name, array))
    return backend_utils.InferenceRequest(inputs=tensors)


def main(argv: list[str]) -> int:
    import numpy as np
    import triton_python_backend_utils as pb  # the fake beside this file

    repository, request_file, result_file = (Path(a) for a in argv)
    importable_before = importlib.util.find_spec("blipdiffusion_trt") is not None
    models = load_python_models(repository, pb)
    bls = next(name for name in models if name.endswith("blip_diffusion"))
    with np.load(request_file) as data:
        arrays = {name: data[name] for name in data.files}
    (response,) = models[bls].execute([request(pb, arrays)])
    if response.has_error():
        raise SystemExit(f"generation failed: {response.error().message()}")
    modules = sorted({str(Path(m.__file__).resolve()) for name, m in sys.modules.items()
                      if (name == "blipdiffusion_trt" or name.startswith("blipdiffusion_trt.")) and getattr(m, "__file__", None)})
    image = pb.get_output_tensor_by_name(response, "image").as_numpy()
    result_file.write_text(json.dumps({"importable_before": importable_before, "modules": modules,
                                       "image": image.tolist(), "models": sorted(models)}))
    for model in models.values():
        model.finalize()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
