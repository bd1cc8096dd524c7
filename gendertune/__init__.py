"""gendertune: tune and compare face-gender classifiers on Ray. The design's folders are its
sub-packages (`gendertune.data_prep`, `.models`, `.tuning`, `.cluster`); `gendertune.base` is the
shared base and `gendertune.cli` the command line. See the README's Layout section."""
