"""One training run: its config, the Ray-free epoch loop (`engine`), the per-worker function
(`worker`), the Ray Datasets (`data`) and the Ray Train run with its held-out evaluation (`run`)."""
