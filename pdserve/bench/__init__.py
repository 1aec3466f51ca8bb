"""``pdserve bench``: an open-loop load generator for any OpenAI-compatible server.

Modules, one concept each:

- :mod:`~pdserve.bench.workload`: what to send (seeded request streams, token-length control);
- :mod:`~pdserve.bench.arrivals`: when to send it (Poisson, constant, gamma);
- :mod:`~pdserve.bench.client`: one streamed request, timed chunk by chunk;
- :mod:`~pdserve.bench.runner`: the open-loop run, warm-up, concurrency limit, rate sweeps;
- :mod:`~pdserve.bench.metrics`: per-request latencies, aggregates, SLOs and goodput;
- :mod:`~pdserve.bench.report` / :mod:`~pdserve.bench.plots`: table, JSON, PNGs;
- :mod:`~pdserve.bench.fake_server`: a server with a known token schedule (tests, baselines);
- :mod:`~pdserve.bench.cli`: the command line.

Nothing here imports torch.
"""
