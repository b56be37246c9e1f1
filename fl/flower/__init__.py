"""fedplan on Flower (``pip install "fedplan[flower]"``; Flower's Message API, 1.41).

The same round logic as the embedded simulation (:mod:`fedplan.fl.server`: plan cache,
selectors, validation, FedAvg) on a real federation: a SuperLink runs
:mod:`.server_app`, every SuperNode runs :mod:`.client_app`. The app folder that
``flwr run`` submits is ``app/`` beside this file (:data:`APP_DIR`).

* :mod:`.config`: the run config and each node's ``node_config``, validated;
* :mod:`.records`: fedplan's messages as Flower records (plan JSON in a ``ConfigRecord``);
* :mod:`.nodes`: the query round and the known nodes, each with its plan;
* :mod:`.strategy`: ``FedPlanStrategy`` (per-node messages, validated FedAvg);
* :mod:`.server_app`, :mod:`.client_app`: the two Flower apps.

Only this package imports ``flwr``; the rest of fedplan never does.
"""

from pathlib import Path

APP_DIR = Path(__file__).resolve().parent / "app"
"""The Flower app folder (its ``pyproject.toml`` names the two apps and the run config)."""

__all__ = ["APP_DIR"]
