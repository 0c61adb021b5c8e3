"""lorazoo: the LoRA family of fine-tuning methods behind one interface.

    import lorazoo
    lorazoo.inject(model, "dora", targets=["q_proj", "v_proj"], r=16, alpha=32)
    optimizer = torch.optim.AdamW(lorazoo.param_groups(model, lr=2e-4))
    ...
    lorazoo.merge(model); lorazoo.unmerge(model)     # exact: the base comes back bit for bit
    lorazoo.save(model, "adapter.safetensors")

Variants are plugins found through the ``lorazoo`` entry-point group; see ``lorazoo.variants()``.
"""

__version__ = "0.1.0"

from .engine import (  # noqa: E402
    AdaptedEmbedding,
    AdaptedLinear,
    MergeReport,
    StepHooks,
    TrainableCount,
    adapter_names,
    after_step,
    attach,
    disabled,
    eject,
    extra_loss,
    inject,
    merge,
    merge_report,
    param_groups,
    route,
    set_active,
    trainable,
    unmerge,
)
from .engine.training import enable_input_grads  # noqa: E402
from .errors import (  # noqa: E402
    AdapterFileError,
    ConfigError,
    LorazooError,
    MergeError,
    PluginError,
    PluginLoadWarning,
    RoutingError,
    TargetError,
    UnknownAdapterVariantError,
    UnknownVariantError,
)
from .hookspecs import hookimpl  # noqa: E402
from .io import load, save  # noqa: E402
from .quant import NF4Linear, QuantReport, dequantize, quantize  # noqa: E402
from .registry import register, unregister, variant, variants  # noqa: E402
from .variant import LayerInfo, LowRank, LowRankAdapter, StepInfo, Variant, VariantConfig  # noqa: E402

# --- plugin authors' module (lorazoo.plugin) ---
# isort: split
from . import plugin  # noqa: E402

# --- end plugin authors' module ---

# ---- layer kinds ----
# isort: split
from .engine.host import AdaptedLayer  # noqa: E402
from .engine.kinds import LayerKind  # noqa: E402
from .engine.kinds.conv1d_hf import AdaptedConv1D  # noqa: E402
from .registry import layer_kinds  # noqa: E402
from .variant import Host, PlainLowRank  # noqa: E402

# isort: split
# ---- end layer kinds ----

__all__ = [
    # layer kinds
    "AdaptedConv1D",
    "AdaptedLayer",
    "Host",
    "LayerKind",
    "PlainLowRank",
    "layer_kinds",
    # end layer kinds
    "AdaptedEmbedding",
    "AdaptedLinear",
    "AdapterFileError",
    "ConfigError",
    "LayerInfo",
    "LorazooError",
    "LowRank",
    "LowRankAdapter",
    "MergeError",
    "RoutingError",
    "MergeReport",
    "NF4Linear",
    "QuantReport",
    "PluginError",
    "PluginLoadWarning",
    "StepHooks",
    "StepInfo",
    "TargetError",
    "TrainableCount",
    "UnknownAdapterVariantError",
    "UnknownVariantError",
    "Variant",
    "VariantConfig",
    "__version__",
    "adapter_names",
    "after_step",
    "attach",
    "dequantize",
    "disabled",
    "eject",
    "enable_input_grads",
    "extra_loss",
    "hookimpl",
    "inject",
    "load",
    "merge",
    "merge_report",
    "param_groups",
    "plugin",  # plugin authors' module
    "quantize",
    "register",
    "save",
    "route",
    "set_active",
    "trainable",
    "unmerge",
    "unregister",
    "variant",
    "variants",
]

# ---- whole trained modules (modules_to_save) and Hugging Face round trips ---------------------
from .hf import base_state_dict, merge_and_unload  # noqa: E402
from .trained import TrainedModules, modules_to_save, trained_modules  # noqa: E402

__all__ += ["TrainedModules", "base_state_dict", "merge_and_unload", "modules_to_save", "trained_modules"]
# ----------------------------------------------------------------------------------------------
