"""Simulated time for pdserve: the real scheduler, block manager and router placement, timed by models.

Modules: :mod:`~pdserve.sim.step_model` (step times), :mod:`~pdserve.sim.link` (KV link),
:mod:`~pdserve.sim.worker` and :mod:`~pdserve.sim.simulator` (the event loop),
:mod:`~pdserve.sim.routing` (the router's placement in simulated time), :mod:`~pdserve.sim.spec`
(deployments, requests, results),
:mod:`~pdserve.sim.hardware` and :mod:`~pdserve.sim.roofline` (accelerators and models on
paper), :mod:`~pdserve.sim.profile` (``pdserve profile``), :mod:`~pdserve.sim.serving` (what serving costs
beyond the steps, measured by it), :mod:`~pdserve.sim.colocation` (a step's slowdown while
another worker of its host computes, measured by it), :mod:`~pdserve.sim.cli`
(``pdserve simulate``) and :mod:`~pdserve.sim.plan` (``pdserve plan``).
"""
