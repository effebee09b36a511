"""Server side: federated rounds, FwdLLM strategies, checkpoints and evaluation."""
