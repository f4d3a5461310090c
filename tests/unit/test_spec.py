"""Pool specs from Python and from TOML, and their errors."""

from __future__ import annotations

import pytest

from dspex_jupyter import PoolSpec, load_pool_specs
from dspex_jupyter.core.errors import InvalidSpec
from dspex_jupyter.core.spec import parse_memory


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512MB", 512_000_000),
        ("4GiB", 4 * 1024**3),
        ("4G", 4 * 1024**3),
        ("1.5GB", 1_500_000_000),
        (1024, 1024),
        ("100", 100),
        ("2 kib", 2048),
        (None, None),
    ],
)
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("bad", ["", "lots", "-1GB", "0", 0, -5, "1XB", True, 1.5, "GB"])
def test_parse_memory_rejects(bad):
    with pytest.raises(InvalidSpec, match="memory size"):
        parse_memory(bad)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "../evil"}, "invalid pool name"),
        ({"name": "a/b"}, "invalid pool name"),
        ({"name": ""}, "invalid pool name"),
        ({"name": "p", "size": 0}, "size must be between 1 and 256"),
        ({"name": "p", "size": "2"}, "size must be an integer"),
        ({"name": "p", "env": "x", "python": "/usr/bin/python3"}, "names env and python"),
        ({"name": "p", "env": "../x"}, "invalid environment name"),
        ({"name": "p", "env_vars": {"A": 1}}, "env_vars must map strings to strings"),
        ({"name": "p", "gpu": "yes"}, "gpu must be true or false"),
        ({"name": "p", "warmup": [1]}, "warmup must be a list of module names"),
        ({"name": "p", "max_memory": "huge"}, "invalid memory size"),
        ({"name": "p", "call_timeout": -1}, "call_timeout must be a positive number"),
        ({"name": "p", "startup": 5}, "startup must be a string"),
    ],
)
def test_invalid_specs(kwargs, message):
    with pytest.raises(InvalidSpec, match=message):
        PoolSpec(**kwargs)


def test_spec_normalises():
    spec = PoolSpec("p", size=2, max_memory="1GiB", warmup="json")
    assert spec.max_memory_bytes == 1024**3 and spec.warmup == ("json",)


def test_dspex_toml(tmp_path):
    path = tmp_path / "dspex.toml"
    path.write_text(
        '[pools.light]\nsize = 4\nmax_memory = "512MB"\nwarmup = ["json"]\n'
        '[pools.light.env_vars]\nA = "1"\n'
        '[pools.mipro]\nenv = "mipro"\ngpu = true\n'
    )
    light, mipro = load_pool_specs(path)
    assert (light.name, light.size, light.max_memory_bytes, light.env_vars) == (
        "light",
        4,
        512_000_000,
        {"A": "1"},
    )
    assert (mipro.env, mipro.gpu) == ("mipro", True)


def test_pyproject_tool_table(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text("[tool.dspex.pools.x]\nsize = 2\n")
    monkeypatch.chdir(tmp_path)
    (spec,) = load_pool_specs()
    assert spec.name == "x" and spec.size == 2


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('[pools.x]\nsize = "four"\n', "size must be an integer"),
        ("[pools.x]\nbogus = 1\n", "unknown key"),
        ('pools = "x"\n', "must be a table"),
        ("[pools\n", "not valid TOML"),
        ("[pools]\nx = 3\n", "must be a mapping"),
    ],
)
def test_bad_config_files(tmp_path, content, message):
    path = tmp_path / "dspex.toml"
    path.write_text(content)
    with pytest.raises(InvalidSpec, match=message):
        load_pool_specs(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(InvalidSpec, match="does not exist"):
        load_pool_specs(tmp_path / "nope.toml")
