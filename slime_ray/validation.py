"""Checks of the job's inputs that run before any resource is taken, and the CLI's error line.

:func:`check_inputs` runs after the prompts are loaded (:func:`slime_ray.data.dataset.load_prompt_data`
already checked the file, the keys, empty prompts and chat roles): every plug-in path on the
command line is imported and its signature checked, labels have a type the reward can use,
and every prompt fits the model's context with ``--rollout-max-response-len`` new tokens.

:func:`run_cli` turns the error classes of bad input into one line on stderr and exit code 2,
with no traceback from deep inside a library. docs/bad_inputs.md lists each bad input and its
message.
"""

from __future__ import annotations

import logging
import sys
from argparse import Namespace
from typing import Any, Callable

from slime_ray.data.dataset import DataError

logger = logging.getLogger(__name__)

# Plug-in flags checked at start: attribute -> positional parameters it is called with (None: any).
PLUGIN_FLAGS: dict[str, list[str] | None] = {
    "custom_generate_function_path": None,  # per-sample or batch form, detected when called
    "dynamic_sampling_filter_path": ["args", "group"],
    "buffer_filter_path": ["args", "rollout_id", "buffer", "num_samples"],
    "data_source_path": None,  # slime's shape takes (args); the seed's takes nothing
    "rollout_function_path": ["args", "rollout_id", "data_source"],
    "custom_loss_function_path": None,
    "rollout_sample_hook_path": None,
    "custom_reward_post_process_path": ["args", "samples"],
}
BUILTIN_RM_WITH_LABEL = ("math", "boxed_math", "f1")


def check_plugins(args: Namespace) -> None:
    """Import every plug-in named on the command line and check its signature.

    Raises:
        slime_ray.plugins.PluginError: naming the flag, the file and what to change.
    """
    from slime_ray.plugins import load_function

    for attr, params in PLUGIN_FLAGS.items():
        spec = getattr(args, attr, None)
        if spec:
            load_function(spec, flag="--" + attr.replace("_", "-"), expected_params=params)
    if getattr(args, "custom_rm_path", None):
        from slime_ray.rollout.rewards import load_custom_rm

        load_custom_rm(args)
    elif getattr(args, "rm_type", None):
        from slime_ray.args import ConfigError
        from slime_ray.rollout.rewards import _builtin_for

        try:
            _builtin_for(args.rm_type)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if getattr(args, "custom_generate_function_path", None):
        from slime_ray.rollout.custom_generate import check_generate_signature

        check_generate_signature(load_function(args.custom_generate_function_path,
                                               flag="--custom-generate-function-path"),
                                 args.custom_generate_function_path)


def check_labels(args: Namespace, prompts: list[dict]) -> None:
    """Labels must be strings or numbers for the built-in rewards (``--rm-type``).

    Raises:
        DataError: naming the row, the type found and ``--label-key``.
    """
    rm = (getattr(args, "rm_type", None) or "").removeprefix("boxed_")
    if getattr(args, "custom_rm_path", None) or not args.label_key or rm not in BUILTIN_RM_WITH_LABEL:
        return
    for i, row in enumerate(prompts):
        label = row.get("label")
        if label is None or isinstance(label, bool) or not isinstance(label, (str, int, float)):
            raise DataError(
                f"--prompt-data {args.prompt_data}: row {i + 1}: label under --label-key {args.label_key!r} "
                f"is {type(label).__name__} ({label!r:.60}); --rm-type {args.rm_type} needs a string or number. "
                f"Fix the row, or score it with --custom-rm-path")


def check_context(args: Namespace, prompts: list[dict]) -> None:
    """Each prompt plus ``--rollout-max-response-len`` must fit the model's context.

    Raises:
        DataError: naming the row, its token count and the flags to change.
    """
    from transformers import AutoConfig

    try:
        ctx = getattr(AutoConfig.from_pretrained(args.hf_checkpoint), "max_position_embeddings", None)
    except (OSError, ValueError):
        return
    if not ctx:
        return
    budget = ctx - args.rollout_max_response_len
    for i, row in enumerate(prompts):
        n = len(row.get("prompt_ids") or ())
        if n > budget:
            raise DataError(
                f"--prompt-data {args.prompt_data}: row {i + 1}: the prompt is {n} tokens; with "
                f"--rollout-max-response-len {args.rollout_max_response_len} that exceeds the model's context of "
                f"{ctx} tokens. Drop long prompts with --rollout-max-prompt-len {max(budget, 1)} or lower "
                f"--rollout-max-response-len")


def check_inputs(args: Namespace, prompts: list[dict]) -> None:
    """All of the above (see the module docstring)."""
    check_plugins(args)
    check_labels(args, prompts)
    check_context(args, prompts)


def user_errors() -> tuple[type[BaseException], ...]:
    """Error classes that mean bad input (a flag, a file, a plug-in, a checkpoint), not a bug."""
    from slime_ray.args import ConfigError
    from slime_ray.checkpoint import CheckpointError
    from slime_ray.fault import TrainerFailure
    from slime_ray.placement import PlacementError
    from slime_ray.plugins import PluginError

    return (ConfigError, DataError, PluginError, CheckpointError, PlacementError, TrainerFailure,
            FileNotFoundError)


def run_cli(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> int:
    """Run a job's ``main``; bad input ends it with one ``slime_ray: error: ...`` line and exit code 2."""
    try:
        result = main(argv)
    except user_errors() as err:
        print(f"slime_ray: error: {err}", file=sys.stderr, flush=True)
        return 2
    if result is not None and hasattr(result, "actor"):  # a finished job leaves no Serve app or actors behind
        from slime_ray.job import shutdown

        try:
            shutdown(result)
        except Exception as err:  # noqa: BLE001 - the job itself succeeded
            logger.warning("shutdown after the job: %s", err)
    return 0
