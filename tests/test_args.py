"""Flag parsing and validation: slime's names, pass-through, and errors that say what to change."""

import pytest

from slime_ray.args import ConfigError, parse_args

BASE = ["--prompt-data", "x.jsonl", "--hf-checkpoint", "/m"]


def test_seed_command_parses_with_slime_names():
    # The seed's train.py command line (with our required data/model flags).
    cfg, args = parse_args(BASE + [
        "--actor-num-nodes", "1", "--actor-num-gpus-per-node", "4", "--rollout-num-gpus", "4",
        "--advantage-estimator", "grpo", "--use-kl-loss", "--kl-loss-coef", "0.001",
        "--rollout-batch-size", "32", "--n-samples-per-prompt", "8", "--global-batch-size", "256",
        "--num-rollout", "3000", "--input-key", "prompt", "--label-key", "label", "--apply-chat-template",
        "--save-interval", "100", "--eval-interval", "50",
        "--tensor-model-parallel-size", "2", "--num-layers", "36", "--sglang-mem-fraction-static", "0.8",
        "--sglang-context-length", "8192", "--sglang-log-level", "INFO"])
    assert cfg.train.num_steps_per_rollout == 1 and args.global_batch_size == 256
    assert args.kl_loss_coef == 0.001 and args.use_kl_loss and args.kl_loss_type == "low_var_kl"
    assert args.sglang_args == {"mem-fraction-static": "0.8", "context-length": "8192", "log-level": "INFO"}
    assert args.megatron_args == {"tensor-model-parallel-size": "2", "num-layers": "36"}
    assert args.loss_agg_mode == "seq-mean-token-mean" and args.eps_clip_high == 0.2


def test_num_steps_per_rollout_derived():
    cfg, _ = parse_args(BASE + ["--rollout-batch-size", "4", "--n-samples-per-prompt", "4",
                                "--global-batch-size", "8"])
    assert cfg.train.num_steps_per_rollout == 2


def test_broken_batch_invariant_names_the_four_numbers():
    with pytest.raises(ConfigError) as e:
        parse_args(BASE + ["--rollout-batch-size", "32", "--n-samples-per-prompt", "8",
                           "--global-batch-size", "100", "--num-steps-per-rollout", "2"])
    msg = str(e.value)
    for part in ("--rollout-batch-size 32", "--n-samples-per-prompt 8", "= 256",
                 "--global-batch-size 100", "--num-steps-per-rollout 2", "= 200"):
        assert part in msg


def test_unknown_flag_suggests_closest():
    with pytest.raises(ConfigError, match="did you mean --rollout-batch-size"):
        parse_args(BASE + ["--rollout-batchsize", "4"])


@pytest.mark.parametrize("flags, fragment", [
    (["--use-kl-loss", "--kl-coef", "0.1"], "not both"),
    (["--kl-loss-coef", "0.1"], "add --use-kl-loss"),
    (["--rollout-temperature", "0"], "--rollout-temperature must be > 0"),
    (["--calculate-per-token-loss", "--loss-agg-mode", "seq-mean-token-sum"], "drop one"),
    (["--eps-clip-c", "0.5"], "--eps-clip-c must be > 1"),
])
def test_contradictory_flags(flags, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_args(BASE + flags)


def test_missing_required_inputs_name_the_flag():
    with pytest.raises(ConfigError, match="--prompt-data is required"):
        parse_args(["--hf-checkpoint", "/m"])
    with pytest.raises(ConfigError, match="--hf-checkpoint is required"):
        parse_args(["--prompt-data", "x.jsonl"])


def test_model_parallel_flags_without_megatron_are_accepted_with_a_warning(caplog):
    # slime scripts carry --tensor-model-parallel-size in MODEL_ARGS: they still run, and say it is ignored
    import logging

    with caplog.at_level(logging.WARNING, logger="slime_ray.args"):
        _, args = parse_args(BASE + ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "1"])
    assert args.megatron_args["tensor-model-parallel-size"] == "2"
    msgs = [r.getMessage() for r in caplog.records]
    assert any("--tensor-model-parallel-size 2 has no effect with --train-backend torch" in m for m in msgs)
    assert not any("pipeline-model-parallel-size" in m for m in msgs)  # 1 is what the torch backend does
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="slime_ray.args"):
        parse_args(BASE + ["--train-backend", "megatron", "--tensor-model-parallel-size", "2"])
    assert not caplog.records
