"""Plugins: a third-party package adds a variant through the ``lorazoo`` entry-point group exactly
as an installed distribution does; broken and conflicting plugins are reported clearly."""

import sys
import textwrap

import pytest
import tomllib
import torch

import lorazoo
import lorazoo.testing
from lorazoo import registry

PLUGIN = '''
"""A third-party variant: LoRA with half the usual scale."""
from dataclasses import dataclass

import lorazoo


@dataclass(frozen=True)
class HalfConfig(lorazoo.VariantConfig):
    pass


class HalfLoRA(lorazoo.LowRankAdapter):
    name = "{name}"
    config_class = HalfConfig

    @property
    def scale(self):
        return self.config.alpha / (2 * self.config.r)


@lorazoo.hookimpl
def lorazoo_variants():
    return [HalfLoRA]
'''


def make_distribution(root, dist, module, variant, body=PLUGIN):
    """Lay out a package the way pip installs it: the module plus a ``.dist-info`` whose
    ``entry_points.txt`` is what the package's pyproject.toml declares."""
    src = root / dist
    pkg = src / module
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "plugin.py").write_text(textwrap.dedent(body.replace("{name}", variant)))
    (src / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""
            [project]
            name = "{dist}"
            version = "0.1"
            dependencies = ["lorazoo"]

            [project.entry-points.lorazoo]
            {variant} = "{module}.plugin"
            """
        )
    )
    declared = tomllib.loads((src / "pyproject.toml").read_text())["project"]["entry-points"]["lorazoo"]
    info = src / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = "".join(f"{k} = {v}\n" for k, v in declared.items())
    (info / "entry_points.txt").write_text(f"[lorazoo]\n{lines}")
    return src


@pytest.fixture
def site(tmp_path):
    """A directory on sys.path standing in for site-packages; the registry re-reads entry points."""
    added = []

    def install(dist, module, variant, body=PLUGIN):
        src = make_distribution(tmp_path, dist, module, variant, body)
        sys.path.insert(0, str(src))
        added.append((str(src), module))
        registry.reload()

    yield install
    for path, module in added:
        sys.path.remove(path)
        for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
            del sys.modules[name]
    registry.reload()


def test_third_party_variant_is_listed_injected_and_conforms(site):
    site("halflora-pkg", "halflora_pkg", "halflora")
    assert "halflora" in lorazoo.variants()
    assert {"lora", "rslora"} <= set(lorazoo.variants())
    assert "halflora_pkg.plugin" in registry.plugin_of("halflora")
    model = torch.nn.Sequential(torch.nn.Linear(8, 6))
    lorazoo.inject(model, "halflora", targets=["0"], r=2, alpha=8)
    assert model[0].adapters["default"].scale == 2.0
    lorazoo.testing.run_conformance("halflora", max_examples=5)


def test_plugin_that_fails_to_import_warns_and_others_work(site):
    site("broken-pkg", "broken_pkg", "broken", body="raise ImportError('missing dependency xyz')\n")
    with pytest.warns(lorazoo.PluginLoadWarning, match="broken.*missing dependency xyz"):
        names = lorazoo.variants()
    assert "broken" not in names and "lora" in names
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    lorazoo.inject(model, "lora", targets=["0"], r=1)


def test_two_plugins_registering_one_name(site):
    site("dup-pkg", "dup_pkg", "lora")
    with pytest.raises(lorazoo.PluginError) as e:
        lorazoo.variants()
    msg = str(e.value)
    assert "'lora' is registered twice" in msg and "lorazoo_plugins.lora" in msg and "dup_pkg.plugin" in msg


def test_in_process_registration_and_bad_plugins():
    class NotAVariant:
        name = "x"

    class Bad:
        @lorazoo.hookimpl
        def lorazoo_variants(self):
            return [NotAVariant]

    with pytest.raises(lorazoo.PluginError, match="not a lorazoo.Variant subclass"):
        lorazoo.register(Bad())
    assert "x" not in lorazoo.variants()  # the failed registration was rolled back
