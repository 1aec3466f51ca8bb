"""S10's llama.cpp side: greedy generation of S streams at once through llama-cpp-python's C API.

Run by ``s10_real_model.py`` with the interpreter of a separate environment
that has ``llama-cpp-python`` (it is built for this benchmark only and is not
a pdserve dependency), so this file imports nothing from pdserve or the
benchmarks folder. It reads one JSON job on stdin::

    {"gguf": path, "prompts": [[ids], ...], "max_tokens": N, "threads": T, "runs": [[streams, tokens], ...]}

and prints one JSON line: the wall time of each run. A run prefills its
streams' prompts in one batch (each stream its own sequence id), then decodes
all streams together one token per step (one ``llama_decode`` per step over
a batch of S tokens), taking the argmax of each stream's logits, EOS ignored:
llama.cpp's own way of serving concurrent streams (as its server does).
"""

from __future__ import annotations

import ctypes
import json
import sys
import time
from typing import Any

import llama_cpp as L
import numpy as np


def main() -> None:
    job = json.loads(sys.stdin.read())
    L.llama_backend_init()
    mparams = L.llama_model_default_params()
    model = L.llama_model_load_from_file(job["gguf"].encode(), mparams)
    if not model:
        raise SystemExit(f"llama.cpp could not load {job['gguf']}")
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    max_streams = max(s for s, _ in job["runs"])
    longest = max(len(p) for p in job["prompts"]) + job["max_tokens"] + 8
    cparams = L.llama_context_default_params()
    cparams.n_ctx = max_streams * longest
    cparams.n_batch = max(max_streams * longest, 512)
    cparams.n_ubatch = 512
    cparams.n_seq_max = max_streams
    cparams.n_threads = job["threads"]
    cparams.n_threads_batch = job["threads"]
    cparams.kv_unified = True
    ctx = L.llama_init_from_model(model, cparams)
    if not ctx:
        raise SystemExit("llama.cpp could not create a context")
    batch = L.llama_batch_init(cparams.n_batch, 0, max_streams)
    results: list[dict[str, Any]] = []
    outputs: list[list[int]] = []

    def add(token: int, pos: int, seq: int, logits: bool) -> None:
        i = batch.n_tokens
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = logits
        batch.n_tokens = i + 1

    def greedy(index: int) -> int:
        row = ctypes.cast(L.llama_get_logits_ith(ctx, index), ctypes.POINTER(ctypes.c_float))
        return int(np.ctypeslib.as_array(row, (n_vocab,)).argmax())

    for streams, tokens in job["runs"]:
        prompts = job["prompts"][:streams]
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        start = time.perf_counter()
        batch.n_tokens = 0
        last_rows = []
        for seq, ids in enumerate(prompts):
            for pos, token in enumerate(ids):
                add(token, pos, seq, pos == len(ids) - 1)
            last_rows.append(batch.n_tokens - 1)
        if L.llama_decode(ctx, batch) != 0:
            raise SystemExit("llama_decode failed on the prompts")
        generated = [[greedy(r)] for r in last_rows]
        for step in range(1, tokens):
            batch.n_tokens = 0
            for seq, ids in enumerate(prompts):
                add(generated[seq][-1], len(ids) + step - 1, seq, True)
            if L.llama_decode(ctx, batch) != 0:
                raise SystemExit("llama_decode failed while decoding")
            for seq in range(streams):
                generated[seq].append(greedy(seq))
        results.append({"streams": streams, "tokens": tokens, "seconds": time.perf_counter() - start})
        outputs = generated
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    print(json.dumps({"runs": results, "last_outputs": outputs, "version": L.__version__}))


if __name__ == "__main__":
    main()
