"""The option table is the one source of names, kinds and defaults: Config repeats none of them.

These tests fail when the table and the Config/TLSConfig dataclasses drift apart: an option
whose value has no field, a field that no option fills (and is not DERIVED), a default written
in a dataclass again, or a field whose type is not what its option's kind produces.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping

import pytest

from mtls_proxy.core.config import DERIVED, Config, TLSConfig, load_config
from mtls_proxy.core.errors import ConfigError
from mtls_proxy.core.options import CLIENT_AUTH_ALIASES, OPTIONS, POLICY_INPUTS, Opt, convert

# The least a valid config needs; every other option keeps its default.
GIVEN = {
    "upstream": "http://127.0.0.1:8080",
    "cert": "s.crt",
    "key": "s.key",
    "cacert": "ca.crt",
    "allow-cn": ["x"],
}


def _field_options() -> list[Opt]:
    return [o for o in OPTIONS if o.name not in POLICY_INPUTS]


def _owner(opt: Opt) -> type:
    return TLSConfig if opt.path[0] == "tls" else Config


def test_every_option_has_its_field_and_every_field_an_option() -> None:
    config = {f.name for f in dataclasses.fields(Config)}
    tls = {f.name for f in dataclasses.fields(TLSConfig)}
    named = {(_owner(o), o.path[-1]) for o in _field_options()}
    assert all(len(o.path) == (2 if o.path[0] == "tls" else 1) for o in _field_options())
    assert {n for t, n in named if t is TLSConfig} == tls
    assert {n for t, n in named if t is Config} == config - DERIVED
    assert config >= DERIVED
    # The policy inputs are no field: they build cfg.policy.
    assert not any(o.path[-1] in config | tls for o in OPTIONS if o.name in POLICY_INPUTS)


def test_no_default_is_written_twice() -> None:
    for cls in (Config, TLSConfig):
        for f in dataclasses.fields(cls):
            assert f.default is dataclasses.MISSING, f"{cls.__name__}.{f.name} repeats a default"
            assert f.default_factory is dataclasses.MISSING, f"{cls.__name__}.{f.name}"


def _value(cfg: Config, opt: Opt) -> object:
    return getattr(cfg.tls if opt.path[0] == "tls" else cfg, opt.path[-1])


def test_each_default_is_the_options_default() -> None:
    cfg = load_config(flags=GIVEN)
    for opt in _field_options():
        if opt.name in GIVEN:
            continue
        want = None if opt.default is None else convert(opt, opt.default, {})
        assert _value(cfg, opt) == want, opt.name
        assert cfg.source(opt.name) == "default"


def _fits(value: object, hint: object) -> bool:
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if origin is tuple:
        item = typing.get_args(hint)[0]
        return isinstance(value, tuple) and all(_fits(v, item) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, float)  # a float kind gives a float, not an int
    return isinstance(value, typing.cast(type, hint))


@pytest.mark.parametrize("opt", _field_options(), ids=lambda o: o.name)
def test_each_field_has_the_type_its_kind_gives(opt: Opt) -> None:
    hint = typing.get_type_hints(_owner(opt))[opt.path[-1]]
    cfg = load_config(flags=GIVEN)
    assert _fits(_value(cfg, opt), hint), (opt.name, hint)
    if typing.get_origin(hint) is typing.Literal:  # the enum's choices are the field's values
        assert set(typing.get_args(hint)) == {CLIENT_AUTH_ALIASES.get(c, c) for c in opt.choices}
        for choice in opt.choices:
            assert _fits(convert(opt, choice, {}), hint)


def test_derived_fields() -> None:
    cfg = load_config(text="", filename="c.yaml", flags=GIVEN)
    assert cfg.config_file == "c.yaml" and isinstance(cfg.sources, Mapping)
    assert [r.name for r in cfg.policy.rules] == ["cn=x"] and cfg.tls.cert == "s.crt"


def test_an_empty_number_key_is_its_default() -> None:
    cfg = load_config(text="workers:\nidle_timeout:\n", filename="c.yaml", flags=GIVEN)
    assert (cfg.workers, cfg.idle_timeout) == (1, 60.0)


def test_a_bad_upstream_cacert_is_reported() -> None:
    with pytest.raises(ConfigError, match="--upstream-cacert: must not be empty"):
        load_config(flags={**GIVEN, "upstream-cacert": ""})


def test_a_cert_without_key_holds_its_key() -> None:
    cfg = load_config(flags={k: v for k, v in GIVEN.items() if k != "key"})
    assert cfg.tls.key == "s.crt" and cfg.source("key") == "--cert"


def test_a_policy_file_alone_is_the_policy() -> None:
    cfg = load_config(flags={**{k: v for k, v in GIVEN.items() if k != "allow-cn"}, "policy": "p"})
    assert cfg.policy_file == "p" and not cfg.policy.has_rules
