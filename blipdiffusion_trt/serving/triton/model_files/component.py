"""Triton python-backend model: one package component on ONNX Runtime's CPU provider.

Written by ``blipdiffusion-trt triton --flavor python-cpu`` as ``<repository>/<component>/1/model.py``,
next to the component's ``model.onnx``. The code is imported from "code_dir" (the repository's
copy in the BLS model's directory; empty: the installed blipdiffusion_trt). Needs numpy and
onnxruntime in the python backend's environment.
"""

import json
import os
import sys

import triton_python_backend_utils as pb_utils

HERE = os.path.dirname(os.path.abspath(__file__))


def _put_code_on_path(model_config):
    """The copy of blipdiffusion_trt named by the "code_dir" parameter goes first on sys.path."""
    code_dir = model_config.get("parameters", {}).get("code_dir", {}).get("string_value", "")
    if code_dir:
        path = code_dir if os.path.isabs(code_dir) else os.path.normpath(os.path.join(HERE, code_dir))
        if path not in sys.path:
            sys.path.insert(0, path)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        _put_code_on_path(config)
        from blipdiffusion_trt.serving.triton.component import OnnxRuntimeComponentModel

        self.model = OnnxRuntimeComponentModel(config, HERE, pb_utils)

    def execute(self, requests):
        return self.model.execute(requests)

    def finalize(self):
        self.model.close()
