"""Slow, obviously-correct oracles used by the tests; never imported by skipvision/."""
