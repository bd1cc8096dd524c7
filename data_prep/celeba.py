"""CelebA's file names, as the official release lays them out and the generated sample copies:
the one place that knows them (prep reads them, make-sample writes them, the demo checks one)."""

IMAGE_DIR = "img_align_celeba"
ATTR_FILE = "list_attr_celeba.txt"
PARTITION_FILE = "list_eval_partition.txt"
IDENTITY_FILE = "identity_CelebA.txt"
