"""The planner benchmark suite (``fedplan bench``, ``fedplan bench-solver``).

* ``run``: every example model at every budget, fedplan's planners and the peers
  (torch.compile's memory-budget partitioner, selective activation checkpointing,
  uniform checkpointing, ActNN-style 2-bit compression) measured side by side;
* ``peers``: how each peer is built, each as users would run it;
* ``solver_bench`` and ``exact``: framework-free graphs (``planner.graphs``), the ILP
  against an exact reference of fedplan's plan space;
* ``report`` and ``plots``: JSON, CSV, markdown, the goal ratios and PNG plots.
"""
