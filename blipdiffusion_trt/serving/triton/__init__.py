"""Triton Inference Server: model repositories for a model package, and the code their models run.

==========================  ================================================================
module                      what it is
==========================  ================================================================
:mod:`.repository`          ``write_triton_repository``: writes a repository (temporary
                            directory, then rename); :data:`~.repository.CODE_FILES` lists
                            the code copied into it
:mod:`.configs`             the ``config.pbtxt`` texts, from the component declarations
:mod:`.cli`                 ``blipdiffusion-trt triton``
:mod:`.engine`              ``TritonEngine``: a runtime engine that calls a component model (BLS)
:mod:`.bls`                 the ``blip_diffusion`` model's logic: the runtime's pipeline over
                            ``TritonEngine``\\ s, request parsing, error responses
:mod:`.python_backend`      what both model files share inside Triton's python backend
``model_files/``            the model files (``model.py``) as they are copied into a repository
==========================  ================================================================

This package imports nothing here, so that a repository's copy of it (``engine``, ``bls``,
``python_backend``) does not need the writer.
"""
