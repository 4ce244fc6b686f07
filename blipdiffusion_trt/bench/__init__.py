"""The benchmark (``blipdiffusion-trt bench``): our runtime next to diffusers, stage by stage.

======================  ====================================================================
module                  what it does
======================  ====================================================================
:mod:`.cli`             the command line and the run: inputs, settings, sides, results files
:mod:`.settings`        the workload every side runs (one setting, prompts, seeded inputs)
:mod:`.stats`           statistics of timed samples
:mod:`.machine`         the machine: CPU, RAM, GPUs, library versions, memory use, device peaks
:mod:`.flops`           FLOPs of the ONNX graphs at one generation's shapes
:mod:`.ours`            our runtime on one backend of the registry
:mod:`.diffusers_side`  diffusers' pipeline, with hooks on its modules
:mod:`.cold_start`      a fresh process per side (also the child's entry point)
:mod:`.report`          the table, ``bench.md`` and ``bench.png``
======================  ====================================================================

The repository's top-level ``bench/`` holds scripts (which import from here) and results.
"""
