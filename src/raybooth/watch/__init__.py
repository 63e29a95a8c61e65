"""Watching a run: Ray's own output out of the terminal (raylog), TensorBoard events (tensorboard),
sample grids during training (validation), and the report at the end (report, metrics)."""
