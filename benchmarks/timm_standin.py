"""Lets timm import without torchvision, for the timm models that ``benchmarks/peers.py`` times.

timm imports torchvision when it is imported: its data pipeline (``timm.data``: transforms, datasets,
interpolation modes) and ``FrozenBatchNorm2d``, which timm's layer-freezing helpers convert to. PyPI's
torchvision does not import beside the CPU torch this project pins, and the benchmark does not need it:
nothing timm computes for the models timed here uses torchvision. ``timm.create_model(name,
pretrained=False)`` for ``convnext_tiny`` and ``swin_tiny_patch4_window7_224`` builds plain torch
modules from timm's own layers (no weights are downloaded, no data pipeline is built), and their forward
calls no torchvision op.

So :func:`import_timm`, only when ``import torchvision`` fails, puts stand-in modules into
``sys.modules`` for exactly the names timm touches while it imports (:data:`STANDIN_NAMES`, found by
importing timm and reading its sources), imports timm, and takes the stand-ins out of ``sys.modules``
again: timm keeps its references to them, while torch's own look-ups of torchvision (the ONNX exporter's,
inductor's) still find none. Nothing is computed by a stand-in: every class raises when instantiated
(its subclasses too), so anything in timm that would need torchvision fails loudly instead.
``InterpolationMode`` is an enumeration of names only, which timm puts in its lookup tables.
"""

from __future__ import annotations

import enum
import importlib
import importlib.machinery
import sys
import types

#: module -> the names timm reads from it at import time (timm 1.0). Names timm imports inside
#: ``try: ... except ImportError`` (the optional datasets, the FX feature extractor) are left out, so
#: timm records them as unavailable.
STANDIN_NAMES: dict[str, tuple[str, ...]] = {
    "torchvision": (),
    "torchvision.ops": (),
    "torchvision.ops.misc": ("FrozenBatchNorm2d",),
    "torchvision.transforms": ("ToTensor",),
    "torchvision.transforms.functional": ("InterpolationMode",),
    "torchvision.datasets": ("CIFAR10", "CIFAR100", "MNIST", "KMNIST", "FashionMNIST", "ImageFolder"),
}


class StandInError(RuntimeError):
    """Raised by every stand-in: what was asked for needs the real torchvision."""


def _unavailable(module: str, name: str) -> type:
    """A class that cannot be instantiated (nor can its subclasses): it raises :class:`StandInError`."""

    def __new__(cls, *args, **kwargs):
        raise StandInError(
            f"{module}.{name} is a stand-in (benchmarks/timm_standin.py): torchvision does not import here, "
            f"and {cls.__name__} needs it"
        )

    return type(name, (), {"__new__": __new__, "__module__": module, "__doc__": "Stand-in; raises."})


class InterpolationMode(enum.Enum):
    """The names of torchvision's interpolation modes, which timm's transform tables list at import."""

    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


InterpolationMode.__module__ = "torchvision.transforms.functional"


def _standin_modules() -> dict[str, types.ModuleType]:
    modules = {}
    for name, attrs in STANDIN_NAMES.items():
        module = types.ModuleType(name, "Stand-in for torchvision (benchmarks/timm_standin.py).")
        module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        module.__path__ = []
        for attr in attrs:
            value = InterpolationMode if attr == "InterpolationMode" else _unavailable(name, attr)
            setattr(module, attr, value)
        modules[name] = module
    for name, module in modules.items():  # submodules as attributes of their parents
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(modules[parent], child, module)
    return modules


def torchvision_importable() -> bool:
    """Whether the real torchvision imports here (a failed import leaves nothing in ``sys.modules``)."""
    try:
        importlib.import_module("torchvision")
        return True
    except Exception:  # ImportError, or the RuntimeError / OSError of a build for another torch
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        return False


def import_timm() -> types.ModuleType:
    """``import timm``, with torchvision's import-time names stood in for when torchvision fails to import."""
    if "timm" in sys.modules or torchvision_importable():
        return importlib.import_module("timm")
    modules = _standin_modules()
    sys.modules.update(modules)
    try:
        return importlib.import_module("timm")
    finally:
        for name, module in modules.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]
