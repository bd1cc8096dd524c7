"""Training, evaluation, hyperparameter search and the model comparison, one sub-package per job,
layered evaluate -> train -> search -> compare."""
