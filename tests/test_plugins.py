"""Plugins: a third-party package adds a variant through the ``lorazoo`` entry-point group exactly
as an installed distribution does; broken and conflicting plugins are reported clearly."""

import ast
import contextlib
import copy
import importlib.util
import inspect
import io
import re
import sys
import textwrap
import typing
import warnings
from pathlib import Path

import pytest
import tomllib
import torch

import lorazoo
import lorazoo.claims
import lorazoo.testing
from lorazoo import registry
from lorazoo.cli import main

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


def lay_out(root, dist, files, pyproject):
    """Lay out a distribution the way pip installs it: its ``files`` (path → text) plus a
    ``.dist-info`` whose ``entry_points.txt`` is what ``pyproject`` declares."""
    src = root / dist
    for rel, text in files.items():
        path = src / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        init = path.parent / "__init__.py"
        if path.parent != src and not init.exists():
            init.write_text("")
    (src / "pyproject.toml").write_text(pyproject)
    declared = tomllib.loads(pyproject)["project"]["entry-points"]["lorazoo"]
    info = src / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = "".join(f"{k} = {v}\n" for k, v in declared.items())
    (info / "entry_points.txt").write_text(f"[lorazoo]\n{lines}")
    return src


def make_distribution(root, dist, module, variant, body=PLUGIN, names=None):
    """A package whose ``<module>/plugin.py`` is ``body``, declared under the entry-point
    ``names`` (default: the variant's name)."""
    declared = "".join(f'{n} = "{module}.plugin"\n' for n in names or [variant])
    pyproject = textwrap.dedent(
        f"""
        [project]
        name = "{dist}"
        version = "0.1"
        dependencies = ["lorazoo"]

        [project.entry-points.lorazoo]
        """
    )
    files = {f"{module}/plugin.py": textwrap.dedent(body.replace("{name}", variant))}
    return lay_out(root, dist, files, pyproject + declared)


@pytest.fixture
def site(tmp_path):
    """A directory on sys.path standing in for site-packages; the registry re-reads entry points."""
    added = []

    def put(src, module):
        sys.path.insert(0, str(src))
        added.append((str(src), module))
        registry.reload()

    def install(dist, module, variant, body=PLUGIN, names=None):
        put(make_distribution(tmp_path, dist, module, variant, body, names), module)

    def install_files(dist, module, files, pyproject):
        put(lay_out(tmp_path, dist, files, pyproject), module)

    install.files = install_files
    install.root = tmp_path
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


MISSPELLED = PLUGIN.replace("def lorazoo_variants():", "def lorazoo_variant():")
UNMARKED = PLUGIN.replace("@lorazoo.hookimpl\n", "")
WRONG_ARGS = PLUGIN.replace("def lorazoo_variants():", "def lorazoo_variants(config):")
LISTS_JUNK = PLUGIN.replace("return [HalfLoRA]", "return [HalfConfig]")


def assert_builtins_work():
    assert {"lora", "dora", "olora"} <= set(lorazoo.variants())
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    lorazoo.inject(model, "lora", targets=["0"], r=1)
    assert lorazoo.trainable(model).trainable == 1 * (4 + 3)


def test_broken_plugin_is_named_when_its_variant_is_asked_for(site):
    site("broken-pkg", "broken_pkg", "broken", body="raise ImportError('missing dependency xyz')\n")
    with pytest.warns(lorazoo.PluginLoadWarning):
        lorazoo.variants()
    with pytest.raises(lorazoo.UnknownVariantError) as e:
        lorazoo.variant("broken")
    assert "plugin 'broken (broken_pkg.plugin)' that would provide it was skipped" in str(e.value)
    assert "ImportError: missing dependency xyz" in str(e.value)
    assert registry.skipped() == {
        "broken (broken_pkg.plugin)": "failed to import: ImportError: missing dependency xyz"
    }
    assert_builtins_work()


def test_misspelled_hook_in_installed_plugin_is_reported_not_ignored(site):
    site("typo-pkg", "typo_pkg", "halflora", body=MISSPELLED)
    with pytest.warns(lorazoo.PluginLoadWarning) as record:
        names = lorazoo.variants()
    msg = str(record[0].message)
    assert "'halflora (typo_pkg.plugin)'" in msg
    assert "implements 'lorazoo_variant' (did you mean 'lorazoo_variants'?)" in msg
    assert "Known hooks: lorazoo_layer_kinds(), lorazoo_variants()" in msg
    assert "halflora" not in names
    with pytest.raises(
        lorazoo.UnknownVariantError, match="would provide it was skipped: implements 'lorazoo_variant'"
    ):
        lorazoo.variant("halflora")
    assert_builtins_work()


def test_plugin_without_marked_hooks_is_reported(site):
    site("unmarked-pkg", "unmarked_pkg", "halflora", body=UNMARKED)
    with pytest.warns(lorazoo.PluginLoadWarning, match=r"unmarked_pkg.*no function marked @lorazoo.hookimpl"):
        assert "halflora" not in lorazoo.variants()
    assert_builtins_work()


def test_hook_with_wrong_arguments_is_reported_and_others_work(site):
    site("args-pkg", "args_pkg", "halflora", body=WRONG_ARGS)
    with pytest.warns(lorazoo.PluginLoadWarning, match=r"args_pkg.*cannot call.*config.*Known hooks"):
        assert "halflora" not in lorazoo.variants()
    assert_builtins_work()


def test_installed_plugin_listing_a_non_variant_is_skipped_and_others_work(site):
    site("junk-pkg", "junk_pkg", "halflora", body=LISTS_JUNK)
    with pytest.warns(
        lorazoo.PluginLoadWarning, match=r"junk_pkg.*HalfConfig.*not a lorazoo.Variant subclass"
    ):
        assert "halflora" not in lorazoo.variants()
    assert_builtins_work()
    assert "junk_pkg" in " ".join(registry.skipped())


def test_two_entry_points_for_one_module_load_it_once(site):
    site("twice-pkg", "twice_pkg", "halflora", names=["halflora", "half-lora"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loading it once is silent
        names = lorazoo.variants()
    assert names.count("halflora") == 1
    assert "twice_pkg.plugin" in registry.plugin_of("halflora")
    model = torch.nn.Sequential(torch.nn.Linear(8, 6))
    lorazoo.inject(model, "halflora", targets=["0"], r=2, alpha=8)
    assert model[0].adapters["default"].scale == 2.0
    assert_builtins_work()


def test_misspelled_hook_in_register_is_an_error_and_changes_nothing():
    class Typo:
        @lorazoo.hookimpl
        def lorazoo_variant(self):
            return [lorazoo.variant("lora")]

    before = lorazoo.variants()
    with pytest.raises(lorazoo.PluginError) as e:
        lorazoo.register(Typo(), name="typo-plugin")
    msg = str(e.value)
    assert "'typo-plugin'" in msg and "did you mean 'lorazoo_variants'?" in msg and "Known hooks:" in msg
    assert lorazoo.variants() == before
    assert registry.manager().get_plugin("typo-plugin") is None  # the name is free again

    class Fine:
        @lorazoo.hookimpl
        def lorazoo_variants(self):
            return []

    plugin = Fine()
    lorazoo.register(plugin, name="typo-plugin")
    try:
        with pytest.raises(lorazoo.PluginError, match="already registered as 'typo-plugin'"):
            lorazoo.register(plugin, name="again")
        with pytest.raises(lorazoo.PluginError, match="'typo-plugin' is already registered"):
            lorazoo.register(Fine(), name="typo-plugin")
    finally:
        lorazoo.unregister(plugin)
    with pytest.raises(lorazoo.PluginError, match="not a registered lorazoo plugin"):
        lorazoo.unregister(plugin)
    assert lorazoo.variants() == before


def test_optional_hook_for_another_version_is_accepted():
    lora = lorazoo.variant("lora")

    class Forward:
        @lorazoo.hookimpl(optionalhook=True)
        def lorazoo_hook_of_a_later_version(self):
            return []

        @lorazoo.hookimpl
        def lorazoo_variants(self):
            return [lora]  # the same class under its own name: not a conflict

    plugin = Forward()
    lorazoo.register(plugin, name="forward-plugin")
    try:
        assert lorazoo.variant("lora") is lora
    finally:
        lorazoo.unregister(plugin)


def test_register_with_wrong_hook_arguments_is_an_error():
    class Args:
        @lorazoo.hookimpl
        def lorazoo_variants(self, config):
            return []

    with pytest.raises(lorazoo.PluginError, match=r"'args-plugin'.*cannot call.*config.*Known hooks"):
        lorazoo.register(Args(), name="args-plugin")
    assert registry.manager().get_plugin("args-plugin") is None


def test_bench_variants_typo_suggests_a_plugin_variant(site, tmp_path):
    site("halflora-pkg", "halflora_pkg", "halflora")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(
            [
                "bench",
                "--quick",
                "--variants",
                "lora,halflroa",
                "--out",
                str(tmp_path / "o"),
                "--cache-dir",
                str(tmp_path / "c"),
            ]
        )
    assert rc == 2 and out.getvalue() == ""
    assert "unknown variant 'halflroa' in --variants (did you mean 'halflora'?)" in err.getvalue()
    assert not (tmp_path / "o").exists() and not (tmp_path / "c").exists()


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


# --------------------------------------------------------------------------------------------
# The plugin guide's example package, built exactly as docs/interface.md shows it
# --------------------------------------------------------------------------------------------

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "interface.md"


def guide_files() -> dict[str, str]:
    """The guide's code blocks whose first line names a file (``# path``), by that path."""
    files = {}
    for block in re.findall(r"```(?:python|toml)\n(.*?)```", GUIDE.read_text(), flags=re.S):
        first, _, rest = block.partition("\n")
        if first.startswith("# ") and ("/" in first or first.strip() == "# pyproject.toml"):
            files[first[2:].strip()] = rest
    return files


def test_guide_example_package_installs_and_conforms(site):
    files = guide_files()
    assert set(files) == {"pyproject.toml", "lorazoo_lorafa/plugin.py", "tests/test_lorafa.py"}
    pyproject = files.pop("pyproject.toml")
    assert tomllib.loads(pyproject)["project"]["entry-points"]["lorazoo"] == {
        "lorafa": "lorazoo_lorafa.plugin"
    }
    test_file = site.root / "lorafa-tests" / "test_lorafa.py"  # the package's tests stay off sys.path
    test_file.parent.mkdir()
    test_file.write_text(files.pop("tests/test_lorafa.py"))
    site.files("lorazoo-lorafa", "lorazoo_lorafa", files, pyproject)
    assert "lorafa" in lorazoo.variants()
    assert registry.plugin_of("lorafa") == "lorafa (lorazoo_lorafa.plugin)"
    # the package's own tests, as the guide writes them
    spec = importlib.util.spec_from_file_location("guide_test_lorafa", test_file)
    tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tests)
    tests.test_only_b_trains()
    tests.test_conforms()
    # a frozen adapter tensor that is a buffer trains not, and still goes to and comes from the file
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8))
    fresh = copy.deepcopy(model)
    lorazoo.inject(model, "lorafa", targets=["0"], r=4)
    A0 = model[0].adapters["default"].lora_A.clone()
    opt = torch.optim.SGD(lorazoo.param_groups(model, lr=0.1))
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 16)).square().sum().backward()
        opt.step()
    adapter = model[0].adapters["default"]
    assert torch.equal(adapter.lora_A, A0) and adapter.lora_B.abs().sum() > 0
    path = site.root / "lorafa.safetensors"
    lorazoo.save(model, path)
    lorazoo.load(fresh, path)
    x = torch.randn(4, 16)
    assert torch.equal(fresh(x), model(x))
    assert torch.equal(fresh[0].adapters["default"].lora_A, A0)


def test_frozen_parameter_instead_of_buffer_is_explained():
    """The mistake the guide warns about: the conformance count names the fix."""
    lora = lorazoo.variant("lora")

    class FrozenParam(lora):
        name = "lorafa-frozen-parameter"

        def __init__(self, layer, config, shared=None):
            super().__init__(layer, config, shared)
            self.lora_A.requires_grad_(False)

        @classmethod
        def num_trainable(cls, d_in, d_out, config):
            return config.r * d_out

    class Plugin:
        @lorazoo.hookimpl
        def lorazoo_variants(self):
            return [FrozenParam]

    plugin = Plugin()
    lorazoo.register(plugin)
    try:
        with pytest.raises(AssertionError) as e:
            lorazoo.testing.run_conformance(FrozenParam.name, max_examples=3, checks=["param_count"])
    finally:
        lorazoo.unregister(plugin)
    msg = str(e.value)
    assert "total must count base and trainable adapter tensors once" in msg
    assert "self.register_buffer(name, tensor)" in msg and "not as nn.Parameter" in msg
