"""The model package's on-disk format: the only code that knows where a package keeps what.

- :mod:`.layout`: every file and folder name (graphs per precision, CPU-fused graphs, engine plans
  and records, timing cache, ONNX Runtime's TensorRT cache, configs, tokenizers).
- :mod:`.manifest`: ``manifest.json`` read, checked, written, updated (export and ``fuse``).
- :class:`ModelPackage`: an opened package (with or without its graphs).
"""

from . import layout
from .layout import PackageLayout
from .manifest import sha256_file
from .model_package import ModelPackage, pipeline_config_json, read_pipeline_config

__all__ = ["ModelPackage", "PackageLayout", "layout", "pipeline_config_json", "read_pipeline_config", "sha256_file"]
