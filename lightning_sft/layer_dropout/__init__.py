"""Stochastic layer dropout: schedules, the drop-rate bandit, block discovery and the dropper (no Lightning)."""
