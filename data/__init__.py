"""RAVDESS data pipeline: file discovery and actor splits (`ravdess`), preprocessing into a cache (`preprocess`,
script `prepare_ravdess`), the torch dataset (`dataset`), archive download (`download`) and a synthetic
stand-in in the real file format (`synthetic`). The contracts are in docs/internals.md."""
