"""Sizing: what an engine needs on the card and the vLLM flags that hold it to that.

Pure arithmetic (``vram``, ``together``, ``flags``) and the measured budgets' store
(``budgets``: one small JSON file, written only by the process that started the engine).
May import only the top-level modules (spec, errors, logs, paths, engine_log).
"""
