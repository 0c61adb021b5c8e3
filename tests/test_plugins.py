"""Plugins: a third-party package adds a variant through the ``lorazoo`` entry-point group exactly
as an installed distribution does; broken and conflicting plugins are reported clearly."""

import ast
import inspect
import sys
import textwrap
import typing
from pathlib import Path

import pytest
import tomllib
import torch

import lorazoo
import lorazoo.claims
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


# --------------------------------------------------------------------------------------------
# The public API for plugin authors: the built-in variants use nothing else
# --------------------------------------------------------------------------------------------

PLUGIN_DIR = Path(__file__).resolve().parents[1] / "plugins"
# The modules a plugin may import from; every other lorazoo module is the engine's business.
PUBLIC_MODULES = {"lorazoo": lorazoo, "lorazoo.plugin": lorazoo.plugin, "lorazoo.claims": lorazoo.claims}


def _is_public(module: str, name: str) -> bool:
    mod = PUBLIC_MODULES[module]
    if name.startswith("_") or not hasattr(mod, name):
        return False
    return name in getattr(mod, "__all__", [name])


def _dotted(node: ast.AST) -> list[str] | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def private_uses(source: str) -> set[str]:
    """Every use of a lorazoo name outside the public plugin API in ``source``: imports of other
    lorazoo modules, ``_``-prefixed or unexported names, and attribute chains such as
    ``lorazoo.engine.hosts``."""
    tree = ast.parse(source)
    bound: dict[str, str] = {}  # local name -> the lorazoo module it stands for
    bad: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] != "lorazoo":
                    continue
                if a.name not in PUBLIC_MODULES:
                    bad.add(f"import {a.name}")
                bound[a.asname or "lorazoo"] = a.name if a.asname else "lorazoo"
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] != "lorazoo":
                continue
            if node.module not in PUBLIC_MODULES:
                bad.add(f"from {node.module} import ...")
                continue
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if full in PUBLIC_MODULES:
                    bound[a.asname or a.name] = full
                elif not _is_public(node.module, a.name):
                    bad.add(f"from {node.module} import {a.name}")
    for node in ast.walk(tree):
        chain = _dotted(node) if isinstance(node, ast.Attribute) else None
        if not chain or chain[0] not in bound:
            continue
        module = bound[chain[0]]
        for part in chain[1:]:
            if f"{module}.{part}" in PUBLIC_MODULES:
                module = f"{module}.{part}"
                continue
            if not _is_public(module, part):
                bad.add(f"{module}.{part}")
            break
    return bad


def test_private_use_checker_catches_what_it_must():
    # the checker itself: each of these reaches past the public API, the last three do not
    assert private_uses("from lorazoo.engine.exact import acc_dtype") == {
        "from lorazoo.engine.exact import ..."
    }
    assert private_uses("import lorazoo\nlorazoo.engine.iter_adapters(m)") == {"lorazoo.engine"}
    assert private_uses("import lorazoo as lz\nlz.registry._lookup()") == {"lorazoo.registry"}
    assert private_uses("from lorazoo import plugin\nplugin._hosts") == {"lorazoo.plugin._hosts"}
    assert private_uses("from lorazoo.plugin import _hosts") == {"from lorazoo.plugin import _hosts"}
    assert private_uses("import lorazoo.errors") == {"import lorazoo.errors"}
    assert private_uses("import lorazoo\nlorazoo.plugin.adapted_layers(m)") == set()
    assert private_uses("from lorazoo.claims import Claim\nfrom lorazoo import LowRankAdapter") == set()
    assert private_uses("import torch\ntorch._foreach_mul(a, b)") == set()


def test_builtin_plugins_use_only_the_public_plugin_api():
    modules = sorted(p for p in PLUGIN_DIR.glob("*.py") if p.name != "__init__.py")
    assert {p.stem for p in modules} >= {"lora", "rslora", "loraplus", "olora", "dora", "vera", "adalora"}
    found = {p.name: private_uses(p.read_text()) for p in modules}
    assert {k: v for k, v in found.items() if v} == {}


def test_plugin_module_is_documented_and_typed():
    for name in lorazoo.plugin.__all__:
        obj = getattr(lorazoo.plugin, name)
        if inspect.isfunction(obj):
            assert obj.__doc__ and obj.__doc__.strip(), name
            hints = typing.get_type_hints(obj)
            assert "return" in hints and set(inspect.signature(obj).parameters) <= set(hints), name
    assert lorazoo.plugin.__doc__ and "docs/interface.md" in lorazoo.plugin.__doc__


def test_plugin_helpers_behave():
    P = lorazoo.plugin
    assert P.accumulation_dtype(torch.bfloat16) is torch.float32
    assert P.accumulation_dtype(torch.float16) is torch.float32
    assert P.accumulation_dtype(torch.float32) is torch.float32
    assert P.accumulation_dtype(torch.float64) is torch.float64

    t = torch.zeros(3)
    v0 = P.tensor_version(t)
    t.add_(1.0)
    assert P.tensor_version(t) == v0 + 1
    with torch.inference_mode():
        assert P.tensor_version(torch.zeros(2)) is None

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4))
    lorazoo.inject(model, "lora", targets=["0", "2"], r=2, name="a")
    lorazoo.inject(model, "lora", targets=["2"], r=1, name="b")
    layers = P.adapted_layers(model)
    assert [(p, type(h)) for p, h in layers] == [("0", lorazoo.AdaptedLinear), ("2", lorazoo.AdaptedLinear)]
    assert [(p, h.out_features) for p, h, _ in P.adapters_named(model, "b")] == [("2", 4)]
    assert [(p, n, a.lora_A.shape[0]) for p, n, a in P.iter_adapters(model)] == [
        ("0", "a", 2),
        ("2", "a", 2),
        ("2", "b", 1),
    ]
    with pytest.raises(lorazoo.LorazooError, match="no adapter named 'c'.*'a', 'b'"):
        P.adapters_named(model, "c")
