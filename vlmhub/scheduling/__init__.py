"""Pure decisions: which engine starts, which is evicted, which queue is served next.

Nothing here does I/O or reads a clock: every function is given ``now`` and the replicas'
views, and returns a decision. The control plane (:mod:`vlmhub.control`) runs the decisions;
``vlmhub simulate`` runs the same ones in simulated time. May import: :mod:`vlmhub.sizing`,
:mod:`vlmhub.config` and the top-level modules; never :mod:`vlmhub.control` or above.
"""
