"""Ahead-of-time compilation of exactly the launches the Triton launchers make, for a GPU target, without a GPU.

The launchers run on meta tensors inside `_common.capture(arch)`, which records each launch instead of running
it. Each recorded launch goes through Triton's own JIT binder (the code `kernel[grid](...)` runs before it
compiles), so signature, constexprs and specialisation attributes are the JIT's, then `triton.compile` for
GPUTarget("cuda", arch, 32) with the launch's warps and stages. Distinct launches compile once, in worker
processes.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import importlib
import json
import multiprocessing
import os
import time

from action_kernels.triton import _common


def specialise(launch: _common.Launch, arch: int) -> dict:
    """The compile request the JIT would make for this launch: {"module", "name", "signature", "constexprs",
    "attrs", "options"} (JSON-serialisable, constexpr and attr keys as lists)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    backend = make_backend(GPUTarget("cuda", arch, 32))
    kwargs = dict(launch.args, **launch.constexprs, num_warps=launch.num_warps, num_stages=launch.num_stages)
    kwargs["debug"] = bool(getattr(fn, "debug", False) or knobs.runtime.debug)
    if hasattr(knobs.compilation, "instrumentation_mode"):
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(**kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return dict(module=fn.fn.__module__, name=fn.fn.__name__, signature=signature,
                constexprs=[[list(k), v] for k, v in constexprs.items()],
                attrs=[[list(k), v] for k, v in attrs.items()], options=dict(options.__dict__))


def request_key(req: dict, arch: int) -> str:
    blob = json.dumps([req, arch], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _compile_worker(req: dict, arch: int, path: str) -> dict:
    """Runs in a worker process: compile one request, write the cubin to `path`."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(req["module"]), req["name"])
    src = ASTSource(fn=fn, signature=req["signature"], constexprs={tuple(k): v for k, v in req["constexprs"]},
                    attrs={tuple(k): v for k, v in req["attrs"]})
    options = {k: (tuple(v) if isinstance(v, list) else v) for k, v in req["options"].items()}
    t0 = time.time()
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    with open(path, "wb") as f:
        f.write(compiled.asm["cubin"])
    return dict(symbol=compiled.metadata.name, dynamic_shared=int(compiled.metadata.shared),
                compile_s=round(time.time() - t0, 1))


def compile_all(jobs: dict[str, tuple[dict, int]], out_dir: str, workers: int) -> dict[str, dict]:
    """jobs: {key: (request, arch)} -> {key: {"cubin", "symbol", "dynamic_shared"} or {"error"}}."""
    os.makedirs(out_dir, exist_ok=True)
    env_saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"  # the workers must compile, not interpret
    results = {}
    try:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, workers), mp_context=ctx) as pool:
            futures = {}
            for key, (req, arch) in jobs.items():
                path = os.path.join(out_dir, f"{req['name'].lstrip('_')}_sm{arch}_{key}.cubin")
                futures[pool.submit(_compile_worker, req, arch, path)] = (key, path)
            for fut in concurrent.futures.as_completed(futures):
                key, path = futures[fut]
                try:
                    results[key] = dict(fut.result(), cubin=path)
                except Exception as exc:  # a compile error is reported for that config, not fatal to the report
                    results[key] = dict(error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}")
    finally:
        if env_saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = env_saved
    return results
