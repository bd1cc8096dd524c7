"""Training, evaluation, hyperparameter search and the model comparison leaderboard."""
