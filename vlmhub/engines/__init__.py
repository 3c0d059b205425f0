"""Engines: the runtimes that start, adopt and stop vLLM engines (local processes, Docker
containers, Ray actors) behind one transport-like seam (``base.Runtime``), the launch request
built from a resolved model (``launch``), and the vLLM CPU environment and tools used by the
test tiers (``vllm_env``, ``vllm_tools``).

Runtime calls may block (Docker SDK, /proc, Ray): the control plane runs them in worker threads.
May import :mod:`vlmhub.config`, :mod:`vlmhub.sizing` and the top-level modules.
"""
