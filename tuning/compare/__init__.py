"""The comparison: search each model, evaluate, rank (`leaderboard`), the ensemble row, the report
and the demo's fixed budget."""
