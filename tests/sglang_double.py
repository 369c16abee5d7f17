"""TEST DOUBLE of an SGLang server -- NOT SGLang. Used only by tests/test_sglang_engine.py.

Runs as a fake ``python -m sglang.launch_server``: ``python tests/sglang_double.py
--model-path DIR --tp-size N --host 127.0.0.1 --port P [any other --flags]``. It serves the
native routes slime_ray's SGLang adapter uses, with the request and response shapes of
SGLang's ``python/sglang/srt/entrypoints/http_server.py`` (commit 0025436e, v0.5.x line) and
``python/sglang/srt/managers/io_struct.py`` (commit 001067ff) -- see the docstring of
:mod:`slime_ray.engines.sglang` for the fields. Nothing here is SGLang code.

What it does instead of inference: a deterministic rule. Token ``k+1`` is
``(31 * token_k + 7 + salt) % vocab_size`` starting from the last prompt id, its log-prob is
``-(0.5 + ((token + salt) % 10) / 10)``, and ``salt`` is derived from the loaded weights
(``--model-path`` safetensors at start, then each ``/update_weights_from_disk`` folder), so a
weight update visibly changes outputs. Sampling params other than ``max_new_tokens`` and
``stop_token_ids`` are recorded, not used.

Behaviour it reproduces (what the adapter relies on):
- ``/pause_generation``: new ``/generate`` calls wait until ``/continue_generation``; mode
  "abort" (default) aborts in-flight requests, "in_place" / "retract" hold them.
- ``/abort_request``: in-flight requests return ``finish_reason {"type": "abort"}`` with the
  tokens generated so far.
- weight updates set ``weight_version`` (a string, as in SGLang); responses carry the version
  current when they finish.
- ``/flush_cache`` answers 400 while requests are generating.

Test-only flags (``--double-*``, passed through the adapter as ``--sglang-double-*``):
``--double-token-delay-s S`` (time per token), ``--double-startup-delay-s S`` (503 from
``/health_generate`` meanwhile), ``--double-fail-on-start`` (log an error, exit 1),
``--double-exit-after-s S`` (the process dies, exit code 3). Test-only routes under
``/_test/``: ``calls`` (every call recorded), ``state`` (incl. the server's ``pid``), ``reset``, ``exit``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response


class DoubleState:
    """Everything the double remembers (weights fingerprint, version, pause, calls)."""

    def __init__(self, opts: argparse.Namespace, argv: list[str]):
        self.opts = opts
        self.argv = argv
        self.started = time.monotonic()
        cfg = _read_config(opts.model_path)
        self.vocab_size = int(cfg.get("vocab_size", 512))
        self.weight_version = "default"
        self.weights = _read_weights(opts.model_path)
        # Names the "model" accepts: the checkpoint's, plus lm_head.weight when tied (SGLang's
        # Llama/Qwen loaders skip it then).
        self.known_names = set(self.weights["names"])
        if cfg.get("tie_word_embeddings"):
            self.known_names.add("lm_head.weight")
        self.resume = asyncio.Event()
        self.resume.set()
        self.paused = False
        self.pause_mode = "abort"
        self.running: dict[str, dict[str, Any]] = {}  # rid -> {"abort", "admitted"}
        self.released_tags: set[str] = set()
        self.groups: dict[str, dict[str, Any]] = {}
        self.calls: list[dict[str, Any]] = []

    @property
    def salt(self) -> int:
        return int(abs(self.weights["checksum"]) * 1000) % 97

    def record(self, route: str, body: Any) -> None:
        self.calls.append({"route": route, "body": body, "t": time.time()})


def _read_config(model_path: str) -> dict[str, Any]:
    path = Path(model_path) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _read_weights(folder: str) -> dict[str, Any]:
    """Names, shapes and a float checksum of every ``*.safetensors`` in ``folder`` (numpy only)."""
    from safetensors import safe_open

    names, shapes, checksum = [], {}, 0.0
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as sf:
            for name in sf.keys():
                arr = sf.get_tensor(name)
                names.append(name)
                shapes[name] = list(arr.shape)
                checksum += float(arr.astype("float64").sum())
    return {"names": sorted(names), "shapes": shapes, "checksum": checksum, "path": str(folder)}


def _prompt_ids(body: dict[str, Any], vocab: int) -> list[int]:
    if body.get("input_ids") is not None:
        return [int(t) for t in body["input_ids"]]
    return [b % vocab for b in str(body.get("text", "")).encode()]


async def _generate_one(st: DoubleState, body: dict[str, Any]) -> dict[str, Any]:
    rid = body.get("rid") or f"r{len(st.calls)}"
    slot = st.running[rid] = {"abort": False, "admitted": False}
    t0 = time.monotonic()
    try:
        await st.resume.wait()  # paused: new requests wait for /continue_generation
        slot["admitted"] = True  # past the pause gate: now in the "scheduler"
        sp = body.get("sampling_params") or {}
        max_new = int(sp.get("max_new_tokens", 16))
        stop_ids = set(sp.get("stop_token_ids") or [])
        prompt = _prompt_ids(body, st.vocab_size)
        tok, ids, lps = (prompt[-1] if prompt else 0), [], []
        finish: dict[str, Any] = {"type": "length", "length": max_new}
        while len(ids) < max_new:
            if slot["abort"]:
                finish = {"type": "abort", "message": "Abort in waiting queue"}
                break
            if not st.resume.is_set() and st.pause_mode != "abort":
                await st.resume.wait()  # in_place / retract: held until continue
                continue
            tok = (31 * tok + 7 + st.salt) % st.vocab_size
            ids.append(tok)
            lps.append(-(0.5 + ((tok + st.salt) % 10) / 10))
            if tok in stop_ids:
                finish = {"type": "stop", "matched": tok}
                break
            await asyncio.sleep(st.opts.double_token_delay_s)
        meta: dict[str, Any] = {
            "id": rid, "finish_reason": finish, "prompt_tokens": len(prompt),
            "completion_tokens": len(ids), "cached_tokens": 0, "weight_version": st.weight_version,
            "e2e_latency": time.monotonic() - t0,
        }
        if body.get("return_logprob"):
            meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(lps, ids)]
        return {"text": "".join(f"<{t}>" for t in ids), "output_ids": ids, "meta_info": meta}
    finally:
        st.running.pop(rid, None)


def _ok(message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"success": True, "message": message, **extra})


def _fail(message: str) -> JSONResponse:
    return JSONResponse({"success": False, "message": message}, status_code=400)


def create_app(st: DoubleState) -> FastAPI:
    """The FastAPI app of the double (routes named as SGLang's)."""
    app = FastAPI()

    @app.get("/health")
    @app.get("/health_generate")
    async def health_generate() -> Response:
        starting = time.monotonic() - st.started < st.opts.double_startup_delay_s
        st.record("/health_generate", None)
        return Response(status_code=503 if starting else 200)

    @app.api_route("/generate", methods=["POST", "PUT"])
    async def generate(request: Request) -> Any:
        body = await request.json()
        st.record("/generate", body)
        if isinstance(body.get("input_ids"), list) and body["input_ids"] and isinstance(body["input_ids"][0], list):
            sps = body.get("sampling_params")
            singles = [{**body, "input_ids": ids, "rid": None,
                        "sampling_params": sps[i] if isinstance(sps, list) else sps}
                       for i, ids in enumerate(body["input_ids"])]
            return await asyncio.gather(*[_generate_one(st, b) for b in singles])
        return await _generate_one(st, body)

    @app.post("/abort_request")
    async def abort_request(request: Request) -> Response:
        body = await request.json()
        st.record("/abort_request", body)
        for rid, slot in st.running.items():  # requests waiting at the pause gate are not seen
            if slot["admitted"] and (body.get("abort_all") or rid == body.get("rid")):
                slot["abort"] = True
        return Response(status_code=200)

    @app.post("/pause_generation")
    async def pause_generation(request: Request) -> JSONResponse:
        body = await _json_or_empty(request)
        st.record("/pause_generation", body)
        st.pause_mode = body.get("mode", "abort")
        if st.pause_mode == "abort":
            for slot in st.running.values():
                slot["abort"] = slot["abort"] or slot["admitted"]
        st.paused = True
        st.resume.clear()
        return JSONResponse({"message": "Generation paused successfully.", "status": "ok"})

    @app.post("/continue_generation")
    async def continue_generation(request: Request) -> JSONResponse:
        st.record("/continue_generation", await _json_or_empty(request))
        st.paused = False
        st.resume.set()
        return JSONResponse({"message": "Generation continued successfully.", "status": "ok"})

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache() -> Response:
        busy = any(s["admitted"] for s in st.running.values())
        st.record("/flush_cache", {"refused": busy})
        return Response(content="Cache flushed.\n", status_code=400 if busy else 200)

    @app.api_route("/release_memory_occupation", methods=["GET", "POST"])
    async def release_memory_occupation(request: Request) -> Any:
        body = await _json_or_empty(request)
        st.record("/release_memory_occupation", body)
        st.released_tags |= set(body.get("tags") or ["weights", "kv_cache", "cuda_graph"])
        return None

    @app.api_route("/resume_memory_occupation", methods=["GET", "POST"])
    async def resume_memory_occupation(request: Request) -> Any:
        body = await _json_or_empty(request)
        st.record("/resume_memory_occupation", body)
        st.released_tags -= set(body.get("tags") or ["weights", "kv_cache", "cuda_graph"])
        return None

    _weight_routes(app, st)
    _test_routes(app, st)
    return app


def _weight_routes(app: FastAPI, st: DoubleState) -> None:
    @app.post("/update_weights_from_disk")
    async def update_weights_from_disk(request: Request) -> JSONResponse:
        body = await request.json()
        path = body.get("model_path", "")
        if not Path(path).is_dir() or not list(Path(path).glob("*.safetensors")):
            st.record("/update_weights_from_disk", {**body, "error": "no safetensors"})
            return _fail(f"Failed to get weights iterator: {path} has no safetensors files")
        weights = _read_weights(path)
        unknown = sorted(set(weights["names"]) - st.known_names) if st.known_names else []
        bad = [n for n in weights["names"] if n in st.weights["shapes"]
               and weights["shapes"][n] != st.weights["shapes"][n]]
        st.record("/update_weights_from_disk", {**body, "loaded": weights,
                                                "files": sorted(os.listdir(path))})
        if unknown or bad:
            return _fail(f"unknown names {unknown[:5]}, shape mismatch {bad[:5]}")
        st.weights = weights
        if body.get("weight_version") is not None:
            st.weight_version = body["weight_version"]
        return _ok("Succeeded to update model weights.", num_paused_requests=0)

    @app.post("/init_weights_update_group")
    async def init_weights_update_group(request: Request) -> JSONResponse:
        body = await request.json()
        st.record("/init_weights_update_group", body)
        st.groups[body.get("group_name", "weight_update_group")] = body
        return _ok("Succeeded to initialize custom process group.")

    @app.post("/update_weights_from_distributed")
    async def update_weights_from_distributed(request: Request) -> JSONResponse:
        body = await request.json()
        st.record("/update_weights_from_distributed", body)
        if body.get("group_name", "weight_update_group") not in st.groups:
            return _fail(f"group {body.get('group_name')} was never initialized")
        if not len(body["names"]) == len(body["dtypes"]) == len(body["shapes"]):
            return _fail("names, dtypes and shapes differ in length")
        if body.get("weight_version") is not None:
            st.weight_version = body["weight_version"]
        return _ok("Succeeded to update parameter online from distributed.")

    @app.post("/update_weights_from_tensor")
    async def update_weights_from_tensor(request: Request) -> JSONResponse:
        body = await request.json()
        sizes = [len(base64.b64decode(p)) for p in body["serialized_named_tensors"]]
        st.record("/update_weights_from_tensor", {**body, "serialized_named_tensors": None,
                                                  "payload_bytes": sizes})
        if body.get("weight_version") is not None:
            st.weight_version = body["weight_version"]
        return _ok("Succeeded to update parameter online from tensor.")

    @app.get("/get_weight_version")
    async def get_weight_version() -> dict[str, Any]:
        return {"weight_version": st.weight_version}


def _test_routes(app: FastAPI, st: DoubleState) -> None:
    @app.get("/_test/calls")
    async def calls() -> list[dict[str, Any]]:
        return st.calls

    @app.get("/_test/state")
    async def state() -> dict[str, Any]:
        return {"weight_version": st.weight_version, "paused": st.paused, "salt": st.salt,
                "weights": st.weights, "released_tags": sorted(st.released_tags),
                "groups": st.groups, "argv": st.argv, "running": len(st.running), "pid": os.getpid()}

    @app.post("/_test/reset")
    async def reset() -> dict[str, Any]:
        st.calls.clear()
        return {"ok": True}

    @app.post("/_test/exit")
    async def exit_now(request: Request) -> dict[str, Any]:
        code = int((await _json_or_empty(request)).get("code", 3))
        threading.Timer(0.05, os._exit, args=(code,)).start()
        return {"exiting": code}


async def _json_or_empty(request: Request) -> dict[str, Any]:
    raw = await request.body()
    return json.loads(raw) if raw else {}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description="TEST DOUBLE of sglang.launch_server")
    p.add_argument("--model-path", required=True)
    p.add_argument("--tp-size", type=int, default=1)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--double-token-delay-s", type=float, default=0.0)
    p.add_argument("--double-startup-delay-s", type=float, default=0.0)
    p.add_argument("--double-exit-after-s", type=float, default=None)
    p.add_argument("--double-fail-on-start", action="store_true")
    opts, _unknown = p.parse_known_args(argv)  # real SGLang flags are accepted and recorded
    print(f"sglang_double: TEST DOUBLE starting with argv {argv}", flush=True)
    if opts.double_fail_on_start:
        print("sglang_double: simulated startup failure: CUDA out of memory (test)", flush=True)
        sys.exit(1)
    if opts.double_exit_after_s is not None:
        threading.Timer(opts.double_exit_after_s, os._exit, args=(3,)).start()
    import uvicorn

    st = DoubleState(opts, argv)
    uvicorn.run(create_app(st), host=opts.host, port=opts.port, log_level="warning")


if __name__ == "__main__":
    main()
