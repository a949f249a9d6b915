"""policyspec.load_yaml in-process, line by line: the errors a config or policy file can hit
(INT-043, INT-044), each named by file, line and column, never echoing the file's text."""

from __future__ import annotations

import pytest
import yaml

from mtls_proxy.core import policyspec
from mtls_proxy.core.errors import ConfigError
from mtls_proxy.core.policyspec import load_yaml


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: 1\nb: \x07secret\n", "f: not valid YAML at line 2, column 4: control characters"),
        ("? [a]\n: 1\n", "f: not valid YAML at line 1, column 3: found unhashable key"),
        ("&a [*a]", "f: an alias refers to a mapping or list that holds it"),
        ("[" * 150 + "]" * 150, "f: nested deeper than 100 levels"),
        ("'a b': 1\n'a b': 2\n", "f: line 2, column 1: duplicate key (first at line 1)"),
        ("routes: 1\nroutes: 2\n", "f: line 2, column 1: duplicate key 'routes' (first at line 1)"),
    ],
)
def test_load_yaml_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_yaml(text, "f")
    assert str(err.value).startswith(message), str(err.value)
    assert "secret" not in str(err.value)


def test_a_key_that_looks_like_data_is_not_echoed() -> None:
    with pytest.raises(ConfigError) as err:
        load_yaml("hunter2 pass: 1\nhunter2 pass: 2\n", "f")
    assert "hunter2" not in str(err.value)


def test_recursion_in_the_pure_python_parser_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without libyaml, PyYAML's recursive parser overflows before our depth check runs."""

    def deep(*_a: object, **_k: object) -> object:
        raise RecursionError

    monkeypatch.setattr(policyspec.yaml, "load", deep)
    with pytest.raises(ConfigError, match="nested deeper than 100 levels"):
        load_yaml("a: 1", "f")


def test_other_yaml_errors_name_only_their_kind() -> None:
    class Odd(yaml.YAMLError):
        pass

    assert policyspec._yaml_error(Odd(), "", "f") == "f: not valid YAML (Odd)"
