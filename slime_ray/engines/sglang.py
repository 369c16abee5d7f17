"""SGLang as a RolloutEngine: one ``sglang.launch_server`` child process per engine replica.

Three layers, each usable alone:

- :class:`SGLangServerProcess` launches ``python -m sglang.launch_server`` (model = the HF
  checkpoint, ``--tp-size`` = ``--rollout-num-gpus-per-engine``, 127.0.0.1 on a free port,
  every ``--sglang-*`` flag passed through with the prefix removed), waits for
  ``/health_generate`` and reports a dead process with the tail of its log.
- :class:`SGLangClient` is a plain httpx client with one method per native route, so tests
  can point it at any URL.
- :class:`SGLangEngine` maps the :mod:`slime_ray.engines.base` contract onto the client.

Protocol source (request / response fields): SGLang's native HTTP API, read from
``sgl-project/sglang`` ``python/sglang/srt/entrypoints/http_server.py`` (commit 0025436e,
the v0.5.x line), ``python/sglang/srt/managers/io_struct.py`` (commit 001067ff, main) and
https://docs.sglang.ai/basic_usage/native_api.html (2026-03). In short:

- ``POST /generate`` ``{rid, input_ids | text, sampling_params, return_logprob}`` ->
  ``{text, output_ids, meta_info: {finish_reason: {"type": "stop"|"length"|"abort", ...},
  prompt_tokens, completion_tokens, weight_version: str,
  output_token_logprobs: [[logprob, token_id, text|None], ...]}}``
- ``GET /health_generate`` -> 200 (healthy) / 503 (starting or stuck)
- ``POST /abort_request`` ``{rid, abort_all}``; ``POST /pause_generation`` ``{mode:
  "abort"|"retract"|"in_place"}``; ``POST /continue_generation``; ``POST /flush_cache``
  (400 while requests run); ``POST /release_memory_occupation`` and
  ``/resume_memory_occupation`` ``{tags: ["weights", "kv_cache", ...] | None}``
- ``POST /update_weights_from_disk`` ``{model_path, load_format, weight_version, flush_cache,
  abort_all_requests}``, ``/init_weights_update_group`` ``{master_address, master_port,
  rank_offset, world_size, group_name, backend}``, ``/update_weights_from_distributed``
  ``{names, dtypes, shapes, group_name, weight_version, flush_cache}``,
  ``/update_weights_from_tensor`` ``{serialized_named_tensors: [base64 str per TP rank],
  load_format, weight_version, flush_cache}`` -> ``{success, message}`` (400 on failure).

SGLang keeps ``weight_version`` as a string (default ``"default"``); this adapter sends
``str(int)`` and reads an integer back, falling back to its own count for other strings.
"""

from __future__ import annotations

import base64
import importlib.util
import itertools
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import torch

from slime_ray.engines.base import RolloutEngine

logger = logging.getLogger(__name__)

SGLANG_INSTALL_HINT = "pip install 'slime_ray[sglang]'"
# Flags the adapter sets itself; passing them as --sglang-* would contradict it.
_RESERVED_FLAGS = {
    "model-path": "--hf-checkpoint",
    "tp-size": "--rollout-num-gpus-per-engine",
    "tp": "--rollout-num-gpus-per-engine",
    "host": None,
    "port": None,
}


class SGLangError(RuntimeError):
    """The SGLang server refused a call, could not be reached, or its process died."""


# --------------------------------------------------------------------------- engine choice
def sglang_available() -> bool:
    """Whether the ``sglang`` package is importable here (checked without importing it)."""
    return importlib.util.find_spec("sglang") is not None


def default_engine() -> str:
    """``"sglang"`` when SGLang is importable and a CUDA device is present, else ``"hf"``."""
    return "sglang" if sglang_available() and torch.cuda.is_available() else "hf"


def require_sglang() -> None:
    """Raise a one-line :class:`~slime_ray.args.ConfigError` naming the extra when SGLang is missing."""
    from slime_ray.args import ConfigError

    if not sglang_available():
        raise ConfigError(
            "--rollout-engine sglang needs SGLang, which is not installed in this environment: "
            f"{SGLANG_INSTALL_HINT} (CUDA machines; in a Ray job put it in the runtime env's pip "
            "list), or use --rollout-engine hf")


def check_engine_choice(args: Any) -> None:
    """Refuse ``--rollout-engine sglang`` where SGLang is missing, before any resource is taken.

    Call it right after flag parsing (the driver, before placement groups or Serve apps).

    Raises:
        ConfigError: one line naming the ``sglang`` extra to install.
    """
    if getattr(args, "rollout_engine", "hf") == "sglang":
        require_sglang()


def sglang_engine_kwargs(args: Any) -> dict[str, Any]:
    """The :class:`SGLangEngine` keyword arguments taken from the flat ``args`` namespace.

    Usage: ``SGLangEngine(args.hf_checkpoint, **sglang_engine_kwargs(args))``.
    """
    return {
        "tp_size": int(args.rollout_num_gpus_per_engine),
        "sglang_args": dict(getattr(args, "sglang_args", None) or {}),
        "seed": getattr(args, "rollout_seed", None),
        "update_weight_buffer_size": int(getattr(args, "update_weight_buffer_size", 512 * 1024**2)),
    }


# --------------------------------------------------------------------------- weight buckets
def bucket_named_tensors(
    named_tensors: dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    buffer_size_bytes: int,
) -> list[list[tuple[str, torch.Tensor]]]:
    """Split named tensors, in order, into buckets of at most ``buffer_size_bytes`` each.

    Used by every weight transport (``--update-weight-buffer-size``). A tensor larger than
    the buffer travels alone in its own bucket. Names are HF parameter names (the torch
    backend's names already are; no conversion).

    Args:
        named_tensors: ``{name: tensor}`` or an iterable of ``(name, tensor)``.
        buffer_size_bytes: bucket capacity in bytes (``numel * element_size``).

    Returns:
        A list of buckets, each a non-empty list of ``(name, tensor)``; empty input -> ``[]``.

    Raises:
        ValueError: ``buffer_size_bytes`` <= 0.
    """
    if buffer_size_bytes <= 0:
        raise ValueError(f"buffer_size_bytes must be > 0, got {buffer_size_bytes}")
    items = named_tensors.items() if isinstance(named_tensors, dict) else named_tensors
    buckets: list[list[tuple[str, torch.Tensor]]] = []
    current: list[tuple[str, torch.Tensor]] = []
    used = 0
    for name, tensor in items:
        size = tensor.numel() * tensor.element_size()
        if current and used + size > buffer_size_bytes:
            buckets.append(current)
            current, used = [], 0
        current.append((name, tensor))
        used += size
    if current:
        buckets.append(current)
    return buckets


def write_hf_safetensors_dir(
    named_tensors: dict[str, torch.Tensor], out_dir: str | os.PathLike, *,
    config_dir: str | os.PathLike | None = None, shard_size_bytes: int = 512 * 1024**2,
) -> Path:
    """Write ``named_tensors`` as an HF safetensors folder (shards + index) SGLang can load.

    Tensors that share storage (tied embeddings) are cloned so each file is valid. The
    ``config.json`` (and generation config) of ``config_dir`` is copied when given.

    Returns:
        ``out_dir`` as a Path.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seen: set[int] = set()
    cpu: dict[str, torch.Tensor] = {}
    for name, t in named_tensors.items():
        t = t.detach().to("cpu").contiguous()
        if t.data_ptr() in seen:
            t = t.clone()
        seen.add(t.data_ptr())
        cpu[name] = t
    shards = bucket_named_tensors(cpu, shard_size_bytes)
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(dict(shard), str(out / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name, _ in shard})
    total = sum(t.numel() * t.element_size() for t in cpu.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    if config_dir is not None:
        for fname in ("config.json", "generation_config.json"):
            src = Path(config_dir) / fname
            if src.is_file():
                shutil.copy(src, out / fname)
    return out


# --------------------------------------------------------------------------- process
def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def passthrough_flags(sglang_args: dict[str, Any]) -> list[str]:
    """``{"mem-fraction-static": "0.8", "enable-memory-saver": True}`` ->
    ``["--mem-fraction-static", "0.8", "--enable-memory-saver"]``.

    ``True`` gives a bare flag, ``False`` / ``None`` drop the flag, a list gives several values.

    Raises:
        ValueError: a flag the adapter sets itself (model path, TP size, host, port).
    """
    flags: list[str] = []
    for key, value in sglang_args.items():
        key = key.replace("_", "-")
        if key in _RESERVED_FLAGS:
            instead = _RESERVED_FLAGS[key]
            hint = f"; use {instead}" if instead else "; slime_ray picks it"
            raise ValueError(f"--sglang-{key} is set by slime_ray itself{hint}")
        if value is None or value is False:
            continue
        flags.append(f"--{key}")
        if value is True:
            continue
        flags.extend(str(v) for v in value) if isinstance(value, (list, tuple)) else flags.append(str(value))
    return flags


def build_server_cmd(
    model_path: str, *, port: int, tp_size: int = 1, host: str = "127.0.0.1",
    sglang_args: dict[str, Any] | None = None, seed: int | None = None,
    launch_cmd: list[str] | None = None,
) -> list[str]:
    """The exact command line of one SGLang server.

    ``launch_cmd`` replaces ``[python, -m, sglang.launch_server]`` (tests run a double).
    ``seed`` becomes ``--random-seed`` unless ``sglang_args`` already sets it.
    """
    cmd = list(launch_cmd or [sys.executable, "-m", "sglang.launch_server"])
    cmd += ["--model-path", str(model_path), "--tp-size", str(int(tp_size)),
            "--host", host, "--port", str(int(port))]
    extra = dict(sglang_args or {})
    cmd += passthrough_flags(extra)
    if seed is not None and "random-seed" not in extra:
        cmd += ["--random-seed", str(int(seed))]
    return cmd


class SGLangServerProcess:
    """One SGLang server as a child process (its own process group), logging to a file.

    Args:
        cmd: the full command line (see :func:`build_server_cmd`).
        log_path: where stdout and stderr go (default: a temp file).
        env: extra environment variables for the child.
    """

    def __init__(self, cmd: list[str], log_path: str | None = None, env: dict[str, str] | None = None):
        self.cmd = list(cmd)
        self.log_path = log_path or tempfile.mkstemp(prefix="sglang_server_", suffix=".log")[1]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self) -> "SGLangServerProcess":
        """Start the child (non-blocking)."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env, start_new_session=True)
        logger.info("started SGLang server pid %s: %s (log %s)", self.proc.pid, " ".join(self.cmd), self.log_path)
        return self

    @property
    def returncode(self) -> int | None:
        """The exit code, or None while running (or never started)."""
        return None if self.proc is None else self.proc.poll()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exited_within(self, timeout_s: float) -> bool:
        """Whether the process has exited, waiting up to ``timeout_s`` seconds. Unlike
        :meth:`alive` it cannot miss an exit: ``Popen.poll()`` returns None while another thread
        (a concurrent health check) holds Popen's waitpid lock, ``wait()`` blocks for it."""
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return False
        return True

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of the server log."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 64 * 1024))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def exit_reason(self) -> str:
        """A one-paragraph explanation of a dead process (exit code + log tail)."""
        return (f"SGLang server process exited with code {self.returncode} "
                f"(cmd: {' '.join(self.cmd)}); last log lines ({self.log_path}):\n{self.log_tail()}")

    def wait_ready(self, client: "SGLangClient", timeout_s: float = 900.0, poll_s: float = 0.5) -> None:
        """Poll ``/health_generate`` until it answers 200.

        Raises:
            SGLangError: the process exited (with its log tail), or ``timeout_s`` passed (the
                process is stopped).
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise SGLangError(self.exit_reason())
            if client.health_generate(timeout_s=max(poll_s, 5.0)):
                return
            time.sleep(poll_s)
        tail = self.log_tail()
        self.stop()
        raise SGLangError(f"SGLang server not healthy after {timeout_s:.0f} s at {client.base_url}; "
                          f"last log lines ({self.log_path}):\n{tail}")

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL after ``grace_s``."""
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


# --------------------------------------------------------------------------- HTTP client
class SGLangClient:
    """One method per SGLang native route (httpx, synchronous, thread-safe).

    Args:
        base_url: e.g. ``http://127.0.0.1:30000``.
        timeout_s: timeout of control calls, seconds (``generate`` and weight updates have none).
    """

    def __init__(self, base_url: str, timeout_s: float = 60.0, max_connections: int = 512):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout_s, trust_env=False,
                                  limits=httpx.Limits(max_connections=max_connections))

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, route: str, body: Any = None, timeout: Any = "default") -> httpx.Response:
        kw: dict[str, Any] = {} if timeout == "default" else {"timeout": timeout}
        try:
            resp = self._http.request(method, route, json=body, **kw)
        except httpx.HTTPError as e:
            raise SGLangError(f"{method} {self.base_url}{route} failed: {type(e).__name__}: {e}") from e
        if resp.status_code >= 400:
            raise SGLangError(f"{method} {route} -> HTTP {resp.status_code}: {resp.text[:500]}")
        return resp

    def _post_json(self, route: str, body: Any = None, timeout: Any = "default") -> Any:
        resp = self._call("POST", route, body if body is not None else {}, timeout)
        if not resp.content:
            return None
        try:
            out = resp.json()
        except ValueError:
            return resp.text
        if isinstance(out, dict) and out.get("success") is False:
            raise SGLangError(f"POST {route} refused: {out.get('message')}")
        return out

    # generation ------------------------------------------------------------
    def generate(self, payload: dict[str, Any]) -> dict[str, Any]:
        """``POST /generate`` with one request; returns SGLang's ``{text, output_ids, meta_info}``."""
        return self._post_json("/generate", payload, timeout=None)

    def health_generate(self, timeout_s: float | None = None) -> bool:
        """``GET /health_generate``: True on 200; False on 503 or when unreachable."""
        try:
            resp = self._http.get("/health_generate", timeout=timeout_s or self.timeout_s)
        except httpx.HTTPError:
            return False
        return resp.status_code == 200

    def abort_request(self, rid: str = "", abort_all: bool = False) -> None:
        """``POST /abort_request``: aborted requests return ``finish_reason.type == "abort"``."""
        self._call("POST", "/abort_request", {"rid": rid, "abort_all": abort_all})

    def pause_generation(self, mode: str = "abort") -> Any:
        """``POST /pause_generation``: new requests wait until continue; ``mode`` says what
        happens to in-flight ones ("abort": return as aborted; "retract" / "in_place": wait)."""
        return self._post_json("/pause_generation", {"mode": mode})

    def continue_generation(self) -> Any:
        return self._post_json("/continue_generation", {})

    def flush_cache(self) -> bool:
        """``POST /flush_cache``: True when flushed, False when refused (requests running)."""
        try:
            resp = self._http.post("/flush_cache")
        except httpx.HTTPError as e:
            raise SGLangError(f"POST {self.base_url}/flush_cache failed: {e}") from e
        return resp.status_code == 200

    def get_weight_version(self) -> str:
        """``GET /get_weight_version`` -> the server's version string."""
        return str(self._call("GET", "/get_weight_version").json()["weight_version"])

    # memory -----------------------------------------------------------------
    def release_memory_occupation(self, tags: list[str] | None = None) -> Any:
        """Free GPU memory (``tags`` among "weights", "kv_cache", "cuda_graph"; None = all)."""
        return self._post_json("/release_memory_occupation", {"tags": tags}, timeout=None)

    def resume_memory_occupation(self, tags: list[str] | None = None) -> Any:
        return self._post_json("/resume_memory_occupation", {"tags": tags}, timeout=None)

    # weights ----------------------------------------------------------------
    def update_weights_from_disk(self, model_path: str, weight_version: str | None = None, *,
                                 load_format: str | None = None, flush_cache: bool = True,
                                 abort_all_requests: bool = False) -> dict[str, Any]:
        """Reload weights from an HF folder; waits for in-flight requests (SGLang's lock)."""
        return self._post_json("/update_weights_from_disk", {
            "model_path": str(model_path), "load_format": load_format, "weight_version": weight_version,
            "flush_cache": flush_cache, "abort_all_requests": abort_all_requests}, timeout=None)

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int,
                                  world_size: int, group_name: str = "weight_update_group",
                                  backend: str = "nccl") -> dict[str, Any]:
        """Join the trainer's broadcast group (the trainer is rank 0; engine ranks from
        ``rank_offset``)."""
        return self._post_json("/init_weights_update_group", {
            "master_address": master_address, "master_port": int(master_port),
            "rank_offset": int(rank_offset), "world_size": int(world_size),
            "group_name": group_name, "backend": backend}, timeout=None)

    def update_weights_from_distributed(self, names: list[str], dtypes: list[str],
                                        shapes: list[list[int]], group_name: str = "weight_update_group",
                                        weight_version: str | None = None, *, flush_cache: bool = True,
                                        load_format: str | None = None) -> dict[str, Any]:
        """Receive one bucket broadcast from trainer rank 0 (the trainer broadcasts
        concurrently with this call)."""
        return self._post_json("/update_weights_from_distributed", {
            "names": list(names), "dtypes": list(dtypes), "shapes": [list(s) for s in shapes],
            "group_name": group_name, "weight_version": weight_version, "flush_cache": flush_cache,
            "load_format": load_format}, timeout=None)

    def update_weights_from_tensor(self, serialized_named_tensors: list[str | bytes],
                                   weight_version: str | None = None, *, load_format: str | None = None,
                                   flush_cache: bool = True) -> dict[str, Any]:
        """Colocated update: one serialized payload per TP rank (bytes are base64-encoded here)."""
        payloads = [base64.b64encode(p).decode() if isinstance(p, bytes) else p
                    for p in serialized_named_tensors]
        return self._post_json("/update_weights_from_tensor", {
            "serialized_named_tensors": payloads, "load_format": load_format,
            "weight_version": weight_version, "flush_cache": flush_cache}, timeout=None)


def serialize_named_tensors(named_tensors: list[tuple[str, torch.Tensor]]) -> bytes:
    """SGLang's own serialization of ``[(name, tensor)]`` for ``/update_weights_from_tensor``
    (CUDA tensors travel as IPC handles). Needs SGLang installed.

    Raises:
        ImportError: SGLang is missing (names the extra to install).
    """
    try:
        from sglang.srt.utils import MultiprocessingSerializer
    except ImportError as e:
        raise ImportError(f"serializing tensors for SGLang needs SGLang: {SGLANG_INSTALL_HINT}") from e
    return MultiprocessingSerializer.serialize(named_tensors)


# --------------------------------------------------------------------------- engine
def _sampling_params(params: dict[str, Any] | None) -> dict[str, Any]:
    """Contract sampling params -> SGLang's (``seed`` -> ``sampling_seed``, None values dropped)."""
    out = {k: v for k, v in (params or {}).items() if v is not None}
    if "seed" in out:
        out["sampling_seed"] = int(out.pop("seed"))
    out.setdefault("no_stop_trim", True)  # keep stop tokens in the output (slime does the same)
    return out


def _parse_version(value: Any, fallback: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return fallback


class SGLangEngine(RolloutEngine):
    """The RolloutEngine contract over one SGLang server (launched here, or given by ``url``).

    Args:
        model_path: HF checkpoint folder (``--hf-checkpoint``).
        tp_size: tensor-parallel size of the server (``--rollout-num-gpus-per-engine``).
        sglang_args: ``args.sglang_args`` (``--sglang-*`` flags, prefix removed).
        seed: ``--random-seed`` of the server (None: SGLang's default).
        launch_cmd: replaces ``python -m sglang.launch_server`` (tests run a double).
        url: attach to a running server instead of launching one.
        port: port to launch on (default: a free one).
        start_timeout_s: how long to wait for ``/health_generate`` (seconds).
        update_weight_buffer_size: shard size (bytes) of the disk weight transfer.
        pause_mode: ``/pause_generation`` mode; "abort" (default, as slime): in-flight
            requests return with finish reason "abort" (partial rollout resumes them), so no
            response mixes weight versions; requests sent while paused wait for resume.
        flush_timeout_s: how long :meth:`flush_cache` retries while requests still run.
        max_concurrency: most requests in flight from one ``generate`` call.
        env: extra environment variables of the server process.

    Raises:
        ConfigError: SGLang is not installed and no ``launch_cmd`` / ``url`` is given
            (raised before any process starts).
        SGLangError: the server exited or did not become healthy in time.
    """

    def __init__(
        self, model_path: str, *, tp_size: int = 1, sglang_args: dict[str, Any] | None = None,
        seed: int | None = None, launch_cmd: list[str] | None = None, url: str | None = None,
        host: str = "127.0.0.1", port: int | None = None, start_timeout_s: float = 900.0,
        update_weight_buffer_size: int = 512 * 1024**2, pause_mode: str = "abort",
        flush_timeout_s: float = 60.0, max_concurrency: int = 256, env: dict[str, str] | None = None,
    ):
        if url is None and launch_cmd is None:
            require_sglang()
        self.model_path = str(model_path)
        self.update_weight_buffer_size = int(update_weight_buffer_size)
        self.pause_mode = pause_mode
        self.flush_timeout_s = flush_timeout_s
        self.weight_version = 0
        self.process: SGLangServerProcess | None = None
        self._inflight: set[str] = set()
        self._lock = threading.Lock()
        self._paused = False
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="sglang-gen")
        if url is None:
            port = port or find_free_port(host)
            cmd = build_server_cmd(self.model_path, port=port, tp_size=tp_size, host=host,
                                   sglang_args=sglang_args, seed=seed, launch_cmd=launch_cmd)
            url = f"http://{host}:{port}"
            self.process = SGLangServerProcess(cmd, env=env)
        self.client = SGLangClient(url)
        if self.process is not None:
            self.process.start()
            weakref.finalize(self, self.process.stop)  # never leave a server behind (also at exit)
            try:
                self.process.wait_ready(self.client, timeout_s=start_timeout_s)
            except BaseException:
                self.shutdown()
                raise

    @classmethod
    def from_args(cls, args: Any, **overrides: Any) -> "SGLangEngine":
        """``SGLangEngine(args.hf_checkpoint, **sglang_engine_kwargs(args), **overrides)``."""
        check_engine_choice(args)
        return cls(args.hf_checkpoint, **{**sglang_engine_kwargs(args), **overrides})

    # ---------------------------------------------------------------- generation
    def generate(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send each request to ``/generate`` concurrently; responses in request order.

        Raises:
            ValueError: a request without ``input_ids`` or ``text``.
            SGLangError: the server refused a request or died (with its log tail).
        """
        payloads = [self._payload(r) for r in requests]
        futures = [self._pool.submit(self._generate_one, p) for p in payloads]
        return [f.result() for f in futures]

    def _payload(self, request: dict[str, Any]) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "rid": uuid.uuid4().hex,
            "sampling_params": _sampling_params(request.get("sampling_params")),
            "return_logprob": bool(request.get("return_logprob", True)),
        }
        if request.get("input_ids") is not None:
            payload["input_ids"] = [int(t) for t in request["input_ids"]]
        elif request.get("text") is not None:
            payload["text"] = str(request["text"])
        else:
            raise ValueError("SGLangEngine.generate: a request needs 'input_ids' or 'text'")
        return payload

    def _generate_one(self, payload: dict[str, Any]) -> dict[str, Any]:
        rid = payload["rid"]
        with self._lock:
            self._inflight.add(rid)
        try:
            out = self.client.generate(payload)
        except SGLangError as e:
            if self.process is not None and not self.process.alive():
                raise SGLangError(self.process.exit_reason()) from e
            raise
        finally:
            with self._lock:
                self._inflight.discard(rid)
        return self._response(out, payload)

    def _response(self, out: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
        """SGLang's ``{text, output_ids, meta_info}`` -> the contract's response dict."""
        meta = out.get("meta_info") or {}
        token_lps = meta.get("output_token_logprobs")
        if token_lps is not None:
            ids = [int(t[1]) for t in token_lps]
            lps = [float(t[0]) if t[0] is not None else 0.0 for t in token_lps]
        else:
            ids, lps = [int(t) for t in out.get("output_ids") or []], []
        finish = meta.get("finish_reason")
        reason = finish.get("type") if isinstance(finish, dict) else finish
        prompt_tokens = meta.get("prompt_tokens", len(payload.get("input_ids") or []))
        return {
            "text": out.get("text", ""),
            "output_ids": ids,
            "output_log_probs": lps if payload["return_logprob"] else [],
            "finish_reason": reason or "abort",
            "weight_version": _parse_version(meta.get("weight_version"), self.weight_version),
            "prompt_tokens": int(prompt_tokens),
            "completion_tokens": int(meta.get("completion_tokens", len(ids))),
        }

    # ---------------------------------------------------------------- weights
    def update_weights(self, named_tensors: dict[str, torch.Tensor], weight_version: int) -> None:
        """CPU / object-store path: write an HF safetensors folder, ``/update_weights_from_disk``,
        delete the folder. SGLang waits for in-flight requests, so none mixes versions.

        Raises:
            SGLangError: the server refused the weights (unknown name, shape mismatch: its message).
        """
        tmp = tempfile.mkdtemp(prefix=f"slime_ray_weights_v{int(weight_version)}_")
        try:
            write_hf_safetensors_dir(named_tensors, tmp, config_dir=self.model_path,
                                     shard_size_bytes=self.update_weight_buffer_size)
            self.client.update_weights_from_disk(tmp, str(int(weight_version)))
            self.weight_version = int(weight_version)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def update_weights_from_disk(self, model_path: str, weight_version: int) -> None:
        """Load an HF folder the server can read (``--update-weight-transport disk``)."""
        self.client.update_weights_from_disk(model_path, str(int(weight_version)))
        self.weight_version = int(weight_version)

    def update_weights_from_tensor(self, serialized_named_tensors: list[str | bytes],
                                   weight_version: int, load_format: str | None = None) -> None:
        """Colocated path: one payload per TP rank (see :func:`serialize_named_tensors`)."""
        self.client.update_weights_from_tensor(serialized_named_tensors, str(int(weight_version)),
                                               load_format=load_format)
        self.weight_version = int(weight_version)

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int,
                                  world_size: int, group_name: str = "weight_update_group",
                                  backend: str = "nccl") -> None:
        """Join the trainer's NCCL broadcast group (the trainer's rank 0 is the source)."""
        self.client.init_weights_update_group(master_address, master_port, rank_offset, world_size,
                                              group_name, backend)

    def update_weights_from_distributed(self, names: list[str], dtypes: list[str],
                                        shapes: list[list[int]], weight_version: int,
                                        group_name: str = "weight_update_group") -> None:
        """Receive one bucket that trainer rank 0 broadcasts in ``group_name``."""
        self.client.update_weights_from_distributed(names, dtypes, shapes, group_name,
                                                    str(int(weight_version)))
        self.weight_version = int(weight_version)

    # ---------------------------------------------------------------- control
    def pause(self) -> None:
        """``/pause_generation`` (mode ``pause_mode``); new requests wait until :meth:`resume`."""
        self.client.pause_generation(self.pause_mode)
        self._paused = True

    def resume(self) -> None:
        self.client.continue_generation()
        self._paused = False

    def flush_cache(self) -> None:
        """``/flush_cache``, retried while the server refuses (requests still running).

        Raises:
            SGLangError: still refused after ``flush_timeout_s`` seconds.
        """
        deadline = time.monotonic() + self.flush_timeout_s
        for attempt in itertools.count():
            if self.client.flush_cache():
                return
            if time.monotonic() > deadline:
                raise SGLangError(f"/flush_cache refused for {self.flush_timeout_s:.0f} s "
                                  f"({attempt + 1} tries): requests are still running")
            time.sleep(min(0.05 * 2**attempt, 1.0))

    def abort(self, abort_all: bool = True) -> None:
        """``/abort_request``: all requests, or only those this engine sent."""
        if abort_all:
            self.client.abort_request(abort_all=True)
            return
        with self._lock:
            rids = list(self._inflight)
        for rid in rids:
            self.client.abort_request(rid=rid)

    def release_memory(self, tags: list[str] | None = None) -> None:
        """``/release_memory_occupation`` (needs ``--sglang-enable-memory-saver``)."""
        self.client.release_memory_occupation(tags)

    def resume_memory(self, tags: list[str] | None = None) -> None:
        self.client.resume_memory_occupation(tags)

    def health(self) -> dict[str, Any]:
        """``{"ok", "weight_version", "paused", "url"}`` (+ ``"reason"`` when not ok); a dead
        server process is not ok, whatever the port answers."""
        info: dict[str, Any] = {"weight_version": self.weight_version, "paused": self._paused,
                                "url": self.client.base_url}
        if self.process is not None and not self.process.alive():
            return {**info, "ok": False, "reason": self.process.exit_reason()}
        if not self.client.health_generate():
            if self.process is not None and self.process.exited_within(0.5):  # it died (or died while we asked)
                return {**info, "ok": False, "reason": self.process.exit_reason()}
            return {**info, "ok": False, "reason": f"{self.client.base_url}/health_generate did not answer 200"}
        return {**info, "ok": True}

    def shutdown(self) -> None:
        """Stop the server process (if launched here) and close the client."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.process is not None:
            self.process.stop()
        if hasattr(self, "client"):
            self.client.close()
