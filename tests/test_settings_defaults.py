"""The settings dataclasses' defaults are the Kconfig tree's defaults: one set of values, read two ways."""

import dataclasses

import pytest

from gpt2.settings import Settings, component_classes
from lib import config as cfg


@pytest.fixture(scope="module")
def kconfig_defaults():
    """Settings as the loader reads the Kconfig tree with no .config at all."""
    return cfg.settings_from_kconfig(cfg.load_kconfig())


@pytest.mark.parametrize("component, cls", component_classes())
def test_every_field_default_is_the_kconfig_default(component, cls, kconfig_defaults):
    read = getattr(kconfig_defaults, component)
    for field in dataclasses.fields(cls):
        assert field.default is not dataclasses.MISSING, f"{cls.__name__}.{field.name} has no default"
        assert field.default == getattr(read, field.name), (
            f"{cls.__name__}.{field.name} defaults to {field.default!r}, but CONFIG_{field.metadata['symbol']} "
            f"reads {getattr(read, field.name)!r} with no .config")


def test_default_settings_stand_alone(kconfig_defaults):
    assert Settings() == kconfig_defaults
    assert Settings().model.head_dim == 64
