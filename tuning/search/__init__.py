"""One model's hyperparameter search: its config, what it searches (`space`) and the Ray Tune +
Optuna run (`run`)."""
