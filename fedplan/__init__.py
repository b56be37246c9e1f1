"""fedplan: a memory planner for on-device and federated training."""
