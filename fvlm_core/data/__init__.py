"""Datasets: a synthetic chest CT cohort in the CT-RATE layout, the CT-RATE reader, and the
model-space sample cache written by ``fvlm prepare``."""
