"""models.yaml: its schema and resolution (``schema``), error locations (``locate``), the
plugin registry (``registry``), vision limits (``vision``) and the GPU's size (``gpu``).

May import :mod:`vlmhub.sizing` (a resolved model carries its budget) and the top-level modules.
"""
