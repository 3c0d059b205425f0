"""The async control plane: the supervisor, its replica state machines and engine operations.

``contract`` is all the router may know of it (leases, snapshots, refusals). Everything else
runs on the router's event loop; engine operations go through the supervisor's
one-operation-per-GPU-node rule. May import every layer below (scheduling, engines, sizing,
config, the top-level modules); never the router, cli or web.
"""
