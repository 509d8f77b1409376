"""Small CNNs trained on Fashion-MNIST, shipped with the package as compression targets.

>>> from tensorly_dataaware.models import load_pretrained
>>> model = load_pretrained("resnet20")  # doctest: +SKIP

The weights (``<name>_fashion.pt``, a ``state_dict``) and their provenance
(``<name>_fashion.json``: test accuracy, training command, seed, torch version) live next to
this file and are produced by ``benchmarks/train_fashion.py``. Models expect inputs
normalized as in :func:`tensorly_dataaware.data.normalize`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from torch import nn

from .resnet import BasicBlock, FashionResNet
from .vgg import FashionVGG

__all__ = [
    "FashionResNet",
    "FashionVGG",
    "BasicBlock",
    "MODEL_BUILDERS",
    "WEIGHTS_DIR",
    "available_models",
    "build_model",
    "weights_path",
    "load_metadata",
    "load_pretrained",
]

#: Architecture name -> constructor (default arguments are the shipped configurations).
MODEL_BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "resnet20": FashionResNet,
    "vgg": FashionVGG,
}

#: Folder of the shipped weights; a module attribute so that tests and users can redirect it.
WEIGHTS_DIR = Path(__file__).resolve().parent


def available_models() -> list[str]:
    """Names accepted by :func:`build_model` and :func:`load_pretrained`, sorted.

    Returns
    -------
    list of str
        Whether trained weights are present for a name is a separate question: see
        :func:`weights_path`.
    """
    return sorted(MODEL_BUILDERS)


def _check_name(name: str) -> None:
    if name not in MODEL_BUILDERS:
        raise ValueError(f"unknown model {name!r}; available: {available_models()}")


def build_model(name: str) -> nn.Module:
    """A freshly initialized (untrained) model of architecture ``name``."""
    _check_name(name)
    return MODEL_BUILDERS[name]()


def weights_path(name: str) -> Path:
    """Path of the shipped ``state_dict`` of ``name`` (which may not exist)."""
    _check_name(name)
    return WEIGHTS_DIR / f"{name}_fashion.pt"


def load_metadata(name: str) -> dict[str, Any]:
    """The training provenance of the shipped weights of ``name`` (empty dict if absent).

    Returns
    -------
    dict
        Keys written by ``benchmarks/train_fashion.py``, among them ``test_accuracy``,
        ``command``, ``seed`` and ``torch_version``.
    """
    path = weights_path(name).with_suffix(".json")
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def load_pretrained(name: str = "resnet20", map_location: Any = "cpu") -> nn.Module:
    """Build model ``name`` and load the weights trained on Fashion-MNIST.

    Parameters
    ----------
    name : {"resnet20", "vgg"}
    map_location : str or torch.device, default "cpu"
        Passed to :func:`torch.load`.

    Returns
    -------
    torch.nn.Module
        The model in ``eval()`` mode.

    Raises
    ------
    FileNotFoundError
        If the weight file is missing; the message gives the command that trains it.
    """
    import torch

    path = weights_path(name)
    if not path.is_file():
        raise FileNotFoundError(
            f"no trained weights for {name!r} at {path}. Train them with "
            f"`python benchmarks/train_fashion.py --model {name} --device cuda` "
            f"(or `bash benchmarks/train_all.sh` for every model), which writes {path.name} "
            f"and its metadata into {path.parent}."
        )
    model = build_model(name)
    # weights_only: the file is a plain state_dict, so refuse anything that needs unpickling code.
    state = torch.load(path, map_location=map_location, weights_only=True)
    model.load_state_dict(state)
    return model.eval()
