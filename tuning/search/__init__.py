"""One model's hyperparameter search: its config, what it searches (`space`) and the Ray Tune +
Optuna run (`run`)."""

import os

# Tune warns ("The `process_trial_result` operation took 0.6 s, which may be a performance
# bottleneck") when one step of its loop takes over 0.5 s, a limit meant for trainables that report
# many times a second. Ours report once per epoch, and on a small machine the driver shares its
# cores with the trials, so one result's processing (Optuna's sqlite write, the trial's logs) may
# take that long while costing a small fraction of the epoch: nothing for a user to act on. Tune
# reads the limit once, as ray.tune is first imported (by this package's `run`), hence here. A
# user's own value wins.
os.environ.setdefault("TUNE_WARN_THRESHOLD_S", "5")
