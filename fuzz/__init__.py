"""Coverage-guided fuzz targets (atheris) for every reader of outside input; see fuzz/README.md."""
