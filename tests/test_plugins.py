"""Plug-in loader: the three spec forms, and every error names the flag and the file."""

import textwrap

import pytest

from slime_ray.plugins import PluginError, load_function, parse_spec

FLAG = "--custom-rm-path"


def write(tmp_path, name, src):
    p = tmp_path / name
    p.write_text(textwrap.dedent(src))
    return str(p)


@pytest.fixture
def plugin_file(tmp_path):
    return write(tmp_path, "my_rm.py", """
        import os  # imported names are not listed as defined

        THRESHOLD = 0.5

        def reward(args, sample):
            return 1.0

        def helper(x, y, z, w):
            return 0

        class CustomRewardModel:
            def __init__(self, model_path):
                self.model_path = model_path

            def compute_reward(self, prompts, responses):
                return [0.0] * len(prompts)
    """)


def test_parse_spec():
    assert parse_spec("a/b.py:fn") == ("file", "a/b.py", "fn")
    assert parse_spec("b.py") == ("file", "b.py", None)
    assert parse_spec("pkg.mod.fn") == ("module", "pkg.mod", "fn")
    assert parse_spec("pkg.mod:fn") == ("module", "pkg.mod", "fn")


def test_file_with_name(plugin_file):
    fn = load_function(f"{plugin_file}:reward", flag=FLAG, expected_params=["args", "sample"])
    assert fn(None, None) == 1.0


def test_file_default_names_and_module_cached(plugin_file):
    fn = load_function(plugin_file, flag=FLAG, default_names=["custom_rm", "reward"])
    fn2 = load_function(f"{plugin_file}:reward", flag=FLAG)
    assert fn is fn2  # same module object: loaded once per process
    cls = load_function(plugin_file, flag=FLAG, default_names=["CustomRewardModel"],
                        expected_params=["model_path"])
    assert cls("m").model_path == "m"


def test_dotted_path():
    fn = load_function("os.path.join", flag=FLAG)
    assert fn("a", "b") == "a/b"
    fn = load_function("os.path:basename", flag=FLAG, expected_params=["p"])
    assert fn("/x/y") == "y"


def test_missing_file(tmp_path):
    missing = str(tmp_path / "nope.py")
    with pytest.raises(PluginError) as e:
        load_function(f"{missing}:reward", flag=FLAG)
    msg = str(e.value)
    assert FLAG in msg and "nope.py" in msg and "does not exist" in msg


def test_missing_attribute_lists_definitions(plugin_file):
    with pytest.raises(PluginError) as e:
        load_function(f"{plugin_file}:rewrd", flag=FLAG)
    msg = str(e.value)
    assert FLAG in msg and "my_rm.py" in msg and "'rewrd'" in msg
    assert "reward" in msg and "CustomRewardModel" in msg and "helper" in msg
    assert "'os'" not in msg


def test_no_default_name(plugin_file):
    with pytest.raises(PluginError) as e:
        load_function(plugin_file, flag=FLAG, default_names=["custom_rm", "compute_reward"])
    msg = str(e.value)
    assert FLAG in msg and "my_rm.py" in msg and "custom_rm" in msg and ":<name>" in msg


def test_not_callable(plugin_file):
    with pytest.raises(PluginError) as e:
        load_function(f"{plugin_file}:THRESHOLD", flag=FLAG)
    msg = str(e.value)
    assert FLAG in msg and "my_rm.py" in msg and "not a function or class" in msg


def test_too_few_positional_params(tmp_path):
    path = write(tmp_path, "sig.py", """
        def reward(sample):
            return 1.0
    """)
    with pytest.raises(PluginError) as e:
        load_function(f"{path}:reward", flag=FLAG, expected_params=["args", "sample"])
    msg = str(e.value)
    assert FLAG in msg and "sig.py" in msg and "(args, sample)" in msg and "1 positional" in msg


def test_too_many_required_params(plugin_file):
    with pytest.raises(PluginError) as e:
        load_function(f"{plugin_file}:helper", flag=FLAG, expected_params=["args", "sample"])
    msg = str(e.value)
    assert FLAG in msg and "my_rm.py" in msg and "defaults" in msg


def test_varargs_and_kwargs_accepted(tmp_path):
    path = write(tmp_path, "var.py", """
        def reward(*args, **kwargs):
            return len(args)
    """)
    fn = load_function(f"{path}:reward", flag=FLAG, expected_params=["args", "sample"])
    assert fn(1, 2) == 2


def test_import_error_in_user_file(tmp_path):
    path = write(tmp_path, "broken.py", """
        import not_a_real_module_xyz
    """)
    with pytest.raises(PluginError) as e:
        load_function(f"{path}:reward", flag="--dynamic-sampling-filter-path")
    msg = str(e.value)
    assert "--dynamic-sampling-filter-path" in msg and "broken.py" in msg
    assert "not_a_real_module_xyz" in msg


def test_missing_module():
    with pytest.raises(PluginError) as e:
        load_function("no_such_pkg_abc.mod.fn", flag=FLAG)
    msg = str(e.value)
    assert FLAG in msg and "no_such_pkg_abc" in msg


def test_empty_spec():
    with pytest.raises(PluginError, match=FLAG):
        load_function("  ", flag=FLAG)


def test_plugin_error_is_value_error():
    assert issubclass(PluginError, ValueError)
