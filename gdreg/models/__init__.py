"""Model zoo (Flax Linen): the reference implementation's families (ResNets, CIFAR ResNets,
DenseNet-BC, VGG with and without BN, PyramidNet, NFNet, its linear model) and two small
CNNs; docs/options.md, "Models", lists them with their parameter counts.

>>> from gdreg.models import create_model
>>> model = create_model("resnet18", num_classes=10)  # doctest: +SKIP
>>> variables = model.init(key, x, train=False)  # doctest: +SKIP
>>> logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])  # doctest: +SKIP

In train mode ``updates["batch_stats"]`` holds that pass's batch statistics (mean and unbiased
variance), not running averages: :mod:`gdreg.engine.running_statistics` turns the passes of a step
into the running statistics that eval mode uses.
"""

from gdreg.models.registry import (
    check_dtype,
    check_name,
    create_model,
    model_names,
    register_model,
)

__all__ = ["check_dtype", "check_name", "create_model", "model_names", "register_model"]
