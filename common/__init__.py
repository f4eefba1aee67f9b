"""What data/ and training/ both use and that is not about training: command-line constants and their checks
(config), atomic file writes (files), processes under torchrun (distributed). Imports nothing of this project."""
