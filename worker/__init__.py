"""The retrain worker: handlers, policy, ledger, ports and adapters, CLI."""
