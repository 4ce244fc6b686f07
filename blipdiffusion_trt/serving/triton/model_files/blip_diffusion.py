"""Triton python-backend model: whole BLIP-Diffusion generations over the component models (BLS).

Written by ``blipdiffusion-trt triton`` as ``<repository>/blip_diffusion/1/model.py``. The
pipeline is blipdiffusion-trt's own ``BlipDiffusionRuntime``; its engines send BLS requests to the
component models named in the "components" parameter. The code is imported from "code_dir"
(default: the copy next to this file; empty: the installed blipdiffusion_trt), the package's
configs and tokenizers from "package_dir" (default: the copy next to this file). Needs numpy,
Pillow and tokenizers in the python backend's environment.
"""

import json
import os
import sys

import triton_python_backend_utils as pb_utils

HERE = os.path.dirname(os.path.abspath(__file__))


def _put_code_on_path(model_config):
    """The copy of blipdiffusion_trt named by the "code_dir" parameter goes first on sys.path."""
    code_dir = model_config.get("parameters", {}).get("code_dir", {}).get("string_value", ".")
    if code_dir:
        path = code_dir if os.path.isabs(code_dir) else os.path.normpath(os.path.join(HERE, code_dir))
        if path not in sys.path:
            sys.path.insert(0, path)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        _put_code_on_path(config)
        from blipdiffusion_trt.serving.triton.bls import BlipDiffusionModel

        self.model = BlipDiffusionModel.from_model_config(config, HERE, pb_utils)

    def execute(self, requests):
        return self.model.execute(requests)

    def finalize(self):
        self.model.close()
