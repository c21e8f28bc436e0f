"""Code that runs inside the per-backend child environments.

The only package that imports torch, transformers, autoawq, auto-gptq or gptqmodel. Each
``<format>_<backend>.py`` module is started as ``python -m qwrap.workers.<module> JOB.json``
(see ``protocol.py`` for the job and event schema); ``hf_validate`` reloads an artifact.
Importing this package itself stays cheap and torch-free, so the parent can use ``protocol``.
"""
