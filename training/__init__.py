"""Plumbing of the training scripts: runtime, the reference train step, checkpoints, run folders and the CV report
(runs), evaluation and checkpoint selection (evaluation), epoch bookkeeping and resume (progress), monitors.

Only plumbing lives here; the loop over stages, epochs and batches, with its step, stays visible in each script.
What is not about training (command-line constants, file writes, torchrun processes) is in common/.
"""
