"""Hydra finds plugins only in the `hydra_plugins` namespace package; this one makes
`hydra/sweeper=agecls_optuna` available to `agecls-train -m`. The study loop is agecls.sweep.sweeper."""
