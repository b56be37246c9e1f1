"""Model files that ship inside the package: each dataset's default model.

Every file here follows the README's model-file contract (``build_model``,
``example_batch``, ``loss_fn``, ``DEFAULT_BATCH_SIZE``), so ``fedplan fl simulate
--dataset D`` runs without ``--model`` after a plain ``pip install``. Two more
conventions the federated strategies use:

* the model is an ``nn.Sequential`` whose top-level children are its **blocks** (ProFL,
  NeuLite and SmartSplit split there: each boundary passes one tensor, an articulation
  point of the captured graph);
* ``build_model(width=1.0)`` builds the same architecture with every hidden width scaled
  (HeteroFL's nested sub-models).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DEFAULT_MODELS", "default_model"]

_HERE = Path(__file__).resolve().parent

DEFAULT_MODELS = {
    "mnist5k": _HERE / "mnist_cnn.py",
    "fashion-mnist": _HERE / "fashion_mobilenet.py",
    "shakespeare": _HERE / "shakespeare_decoder.py",
    "digits": _HERE / "digits_cnn.py",
}


def default_model(dataset: str) -> str:
    """The packaged model file for ``dataset`` (the MNIST CNN for unknown names: a
    dataset file's own default comes from its ``DEFAULT_MODEL``)."""
    return str(DEFAULT_MODELS.get(dataset, DEFAULT_MODELS["mnist5k"]))
