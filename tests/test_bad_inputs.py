"""Every bad input of docs/bad_inputs.md: the error class and the message it gets (one row, one case).

No Ray: each case is caught by flag parsing, prompt loading, the input checks of
:mod:`slime_ray.validation`, checkpoint lookup or the reward hub, before any resource is taken
(rewards: the sample is marked failed and counted, the job goes on).
"""

import asyncio
import json
import os
import pathlib

import pytest

from slime_ray.args import ConfigError, parse_args
from slime_ray.checkpoint import CheckpointError, find_resume
from slime_ray.data.dataset import DataError, load_prompt_data
from slime_ray.plugins import PluginError
from slime_ray.types import Sample, SampleStatus

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "bad_inputs.md"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from slime_ray.testing import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("bad") / "model")


def _write(tmp, name, text):
    p = tmp / name
    p.write_text(text)
    return p


def _args(tmp, model, rows=None, extra=()):
    data = _write(tmp, "d.jsonl", "\n".join(json.dumps(r) for r in (rows or [{"input": "1+1?", "label": "2"}])))
    return parse_args(["--prompt-data", str(data), "--hf-checkpoint", str(model), "--label-key", "label",
                       "--rollout-batch-size", "1", "--n-samples-per-prompt", "2", *extra])[1]


def _prepare(args):
    from slime_ray import job

    return job.prepare_inputs(args)


def _reward(tmp, model, body, extra=()):
    from slime_ray.rollout.rewards import compute_rewards

    rm = _write(tmp, "rm.py", body)
    args = _args(tmp, model, extra=["--custom-rm-path", str(rm), *extra])
    samples = [Sample(index=i, prompt="p", label="2", response="2", tokens=[1, 2], response_length=1,
                      status=SampleStatus.COMPLETED) for i in range(2)]
    batch = asyncio.run(compute_rewards(args, samples))
    assert batch.num_failed == 2 and all(s.status == SampleStatus.FAILED for s in samples)
    raise RuntimeError(f"{batch.num_failed} samples failed")  # what the driver reports as rollout/failed


BF_SRC = "def pick(buffer):\n    return buffer\n"
FILTER_SRC = "def keep(args, group):\n    return True\n"

CASES = {
    "malformed_jsonl": (lambda t, m: load_prompt_data(_write(t, "x.jsonl", '{"input": "a"}\n{"input": \n')),
                        DataError, "line 2: invalid JSON"),
    "corrupt_parquet": (lambda t, m: load_prompt_data(_write(t, "x.parquet", "not parquet")),
                        DataError, "cannot read parquet"),
    "missing_input_key": (lambda t, m: load_prompt_data(_write(t, "x.jsonl", '{"question": "a"}\n'), input_key="prompt"),
                          DataError, "no key 'prompt' (set by --input-key)"),
    "missing_label_key": (lambda t, m: load_prompt_data(_write(t, "x.jsonl", '{"input": "a"}\n'), label_key="answer"),
                          DataError, "no key 'answer' (set by --label-key)"),
    "empty_prompt": (lambda t, m: load_prompt_data(_write(t, "x.jsonl", '{"input": "  "}\n')),
                     DataError, "line 1: empty prompt"),
    "unknown_chat_role": (lambda t, m: load_prompt_data(_write(
        t, "x.jsonl", json.dumps({"input": [{"role": "robot", "content": "hi"}]}) + "\n")),
        DataError, "unknown role 'robot'"),
    "prompt_not_str_or_messages": (lambda t, m: load_prompt_data(_write(t, "x.jsonl", '{"input": 5}\n')),
                                   DataError, "must be a string or a list of chat messages"),
    "missing_prompt_file": (lambda t, m: load_prompt_data(t / "nope.jsonl"), DataError, "no such file"),
    "label_wrong_type": (lambda t, m: _prepare(_args(t, m, rows=[{"input": "1+1?", "label": {"a": 1}}])),
                         DataError, "row 1: label under --label-key 'label' is dict"),
    "prompt_longer_than_context": (lambda t, m: _prepare(_args(t, m, rows=[{"input": "7 " * 50, "label": "1"}],
                                                               extra=["--rollout-max-response-len", "500"])),
                                   DataError, "exceeds the model's context of 512 tokens"),
    "plugin_file_missing": (lambda t, m: _prepare(_args(t, m, extra=["--custom-rm-path", str(t / "no_rm.py")])),
                            PluginError, "--custom-rm-path: file"),
    "plugin_wrong_signature": (lambda t, m: _prepare(_args(t, m, extra=[
        "--buffer-filter-path", str(_write(t, "bf.py", BF_SRC)) + ":pick"])),
        PluginError, "--buffer-filter-path"),
    "plugin_attribute_missing": (lambda t, m: _prepare(_args(t, m, extra=[
        "--dynamic-sampling-filter-path", str(_write(t, "f.py", FILTER_SRC)) + ":nope"])),
        PluginError, "nope"),
    "reward_nan": (lambda t, m: _reward(t, m, "async def reward(args, sample):\n    return float('nan')\n"),
                   RuntimeError, "2 samples failed"),
    "reward_raises": (lambda t, m: _reward(t, m, "async def reward(args, sample):\n    raise KeyError('x')\n"),
                      RuntimeError, "2 samples failed"),
    "reward_timeout": (lambda t, m: _reward(t, m, "import asyncio\nasync def reward(args, sample):\n"
                                            "    await asyncio.sleep(5)\n", extra=["--rm-timeout", "0.2"]),
                       RuntimeError, "2 samples failed"),
    "kl_loss_and_kl_coef": (lambda t, m: _args(t, m, extra=["--use-kl-loss", "--kl-coef", "0.1"]),
                            ConfigError, "--use-kl-loss and --kl-coef are both set"),
    "batch_invariant": (lambda t, m: _args(t, m, extra=["--global-batch-size", "3"]),
                        ConfigError, "batch invariant broken"),
    "unknown_flag": (lambda t, m: _args(t, m, extra=["--rollout-batchsize", "2"]),
                     ConfigError, "did you mean --rollout-batch-size"),
    "temperature_zero": (lambda t, m: _args(t, m, extra=["--rollout-temperature", "0"]),
                         ConfigError, "--rollout-temperature must be > 0"),
    "health_check_timeout_zero": (lambda t, m: _args(t, m, extra=["--use-fault-tolerance",
                                                                  "--rollout-health-check-timeout", "0"]),
                                  ConfigError, "must be > 0 seconds"),
    "save_hf_without_save": (lambda t, m: _args(t, m, extra=["--save-hf", str(t / "hf")]),
                             ConfigError, "--save-hf exports at each save"),
    "load_without_checkpoint": (lambda t, m: find_resume(_args(t, m, extra=["--load", str(t)])),
                                CheckpointError, "no complete checkpoint"),
    "load_corrupt_meta": (lambda t, m: (os.makedirs(t / "ck" / "iter_0000002"),
                                        _write(t / "ck" / "iter_0000002", "meta.json", "{broken"),
                                        find_resume(_args(t, m, extra=["--load", str(t / "ck")]))),
                          CheckpointError, "meta.json is unreadable"),
    "generate_wrong_signature": (lambda t, m: _prepare(_args(t, m, extra=[
        "--custom-generate-function-path",
        str(_write(t, "gen.py", "async def generate(args, sample):\n    return sample\n")) + ":generate"])),
        PluginError, "neither accepted signature"),
    "rm_type_unknown": (lambda t, m: _prepare(_args(t, m, extra=["--rm-type", "nonsense"])),
                        ConfigError, "--rm-type 'nonsense' is not a built-in reward"),
    "flag_value_wrong_type": (lambda t, m: _args(t, m, extra=["--num-rollout", "three"]),
                              ConfigError, "argument --num-rollout: invalid int value: 'three'"),
    "eval_data_missing": (lambda t, m: __import__("slime_ray.rollout.eval", fromlist=["Evaluator"]).Evaluator.from_args(
        _args(t, m, extra=["--eval-prompt-data", "aime", str(t / "nope.jsonl")])),
        DataError, "--eval-prompt-data aime"),
    "megatron_tp_does_not_split_model": (lambda t, m: _prepare(_args(t, m, extra=[
        "--train-backend", "megatron", "--tensor-model-parallel-size", "4", "--actor-num-gpus-per-node", "4",
        "--rollout-batch-size", "2", "--global-batch-size", "4"])),
        ConfigError, "with --train-backend megatron: --tensor-model-parallel-size 4 does not divide num_query_groups=2"),
    "train_compile_with_megatron": (lambda t, m: _args(t, m, extra=["--train-backend", "megatron", "--train-compile", "true"]),
                                    ConfigError, "--train-compile true applies to --train-backend torch"),
}


def test_generate_function_returning_none_is_named():
    """A generate function that returns None fails the step with the flag, not an AttributeError."""
    from slime_ray.rollout.custom_generate import make_group_generate

    async def generate(args, sample, sampling_params):
        return None

    run = make_group_generate(generate)
    with pytest.raises(PluginError, match="--custom-generate-function-path .*returned NoneType"):
        asyncio.run(run(None, [Sample(index=0)], {}))


def test_sampling_params_are_checked():
    from slime_ray.engines.base import check_sampling_params

    for bad, msg in (({"temperature": -1}, "temperature must be >= 0"), ({"top_p": 1.5}, "top_p must be in"),
                     ({"top_k": 0}, "top_k must be -1"), ({"max_new_tokens": 0}, "max_new_tokens must be >= 1")):
        with pytest.raises(ValueError, match=msg):
            check_sampling_params(bad)
    check_sampling_params({"temperature": 0, "top_p": 1.0, "top_k": -1, "max_new_tokens": 8})


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gets_a_clear_error(case, tmp_path, model):
    fn, exc, needle = CASES[case]
    with pytest.raises(exc) as err:
        fn(tmp_path, model)
    assert needle in str(err.value), str(err.value)
    assert f"`{case}`" in DOC.read_text(), f"docs/bad_inputs.md has no row for {case}"


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    """weights_only=True: a trainer_state.pt that carries a callable does not load."""
    import pickle

    import torch

    torch.save({"x": os.system}, tmp_path / "evil.pt", pickle_protocol=pickle.DEFAULT_PROTOCOL)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "evil.pt", weights_only=True)


def test_cli_prints_one_line_for_bad_input(tmp_path):
    """jobs/grpo.py: a bad flag ends with one 'slime_ray: error:' line and exit code 2, no traceback."""
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "jobs" / "grpo.py"), "--prompt-data", "x.jsonl",
                          "--hf-checkpoint", "m", "--use-kl-loss", "--kl-coef", "0.1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("slime_ray: error: --use-kl-loss and --kl-coef") and "Traceback" not in out.stderr


def test_cli_missing_megatron_is_one_line_before_ray(model):
    """--train-backend megatron without megatron-core: one 'slime_ray: error:' line naming the extra,
    exit code 2, before Ray starts (megatron-core hidden from the import system)."""
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    code = (
        "import importlib.util, runpy, sys\n"
        "real = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda n, *a, **k: None if n.startswith('megatron') else real(n, *a, **k)\n"
        f"sys.argv = ['grpo.py', '--hf-checkpoint', {str(model)!r},\n"
        f"            '--prompt-data', {str(root / 'examples/math_grpo/train.jsonl')!r}, '--input-key', 'prompt',\n"
        "            '--label-key', 'label', '--train-backend', 'megatron', '--tensor-model-parallel-size', '2']\n"
        f"sys.path.insert(0, {str(root)!r})\n"
        f"runpy.run_path({str(root / 'jobs/grpo.py')!r}, run_name='__main__')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("slime_ray: error: --train-backend megatron needs megatron-core")
    assert "pip install 'slime_ray[megatron]'" in lines[-1] and "Traceback" not in out.stderr
    assert "Started a local Ray instance" not in out.stderr + out.stdout
