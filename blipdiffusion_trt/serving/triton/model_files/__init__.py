"""Triton model files: each is copied into a repository as ``<model>/1/model.py``.

Triton's python backend runs them (they import ``triton_python_backend_utils``, which only its
stub provides); this package never imports them. Each puts the repository's copy of
``blipdiffusion_trt`` on ``sys.path`` and hands its work to a normal module:

- ``blip_diffusion.py``: the BLS model, :class:`~blipdiffusion_trt.serving.triton.bls.BlipDiffusionModel`;
- ``component.py``: a ``python-cpu`` component model,
  :class:`~blipdiffusion_trt.serving.triton.component.OnnxRuntimeComponentModel`.
"""
