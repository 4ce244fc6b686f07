"""Serving front ends for model packages: Triton Inference Server (:mod:`.triton`)."""
