"""Plumbing shared by every script: overrides, runtime, the train step, checkpoints, run folders, monitors.

Only plumbing lives here; the loop over stages, epochs and batches stays visible in each script.
"""
