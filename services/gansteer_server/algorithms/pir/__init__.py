"""Seed 000's PIR loop in pure torch: simulated interactions, the binned PIR estimator, guarded generator tuning."""
