"""blipdiffusion-trt: export BLIP-Diffusion to ONNX/TensorRT and run it without torch."""

__version__ = "0.1.0"
