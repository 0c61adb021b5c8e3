"""The one shared injection / routing / merge engine. It knows no variant by name."""

from .host import AdaptedLayer
from .inject import adapter_names, eject, hosts, inject, iter_adapters, plan
from .layer import AdaptedEmbedding, AdaptedLinear
from .merge import MergeReport, merge, merge_report, unmerge
from .routing import route
from .training import (
    StepHooks,
    TrainableCount,
    after_step,
    attach,
    disabled,
    extra_loss,
    param_groups,
    set_active,
    trainable,
)

__all__ = [
    "AdaptedEmbedding",
    "AdaptedLayer",
    "AdaptedLinear",
    "MergeReport",
    "TrainableCount",
    "StepHooks",
    "adapter_names",
    "after_step",
    "attach",
    "disabled",
    "eject",
    "extra_loss",
    "hosts",
    "inject",
    "iter_adapters",
    "merge",
    "merge_report",
    "param_groups",
    "plan",
    "route",
    "set_active",
    "trainable",
    "unmerge",
]
