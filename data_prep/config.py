"""PrepConfig: every setting of the prep stage, validated before any work starts."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from cluster.config import ConfigError, StageConfig


@dataclasses.dataclass
class PrepConfig(StageConfig):
    section = "prep"

    data: str = ""
    out: str = ""
    labels: str | None = None  # default: list_attr_celeba.txt, else the single *.csv in --data
    attribute: str = "Male"
    image_column: str | None = None  # CSV labels only; auto-detected when unset
    split: Literal["random", "official", "identity"] = "random"
    ratios: tuple[float, ...] = (0.8, 0.2)
    image_size: int = 128
    seed: int = 0
    overwrite: bool = False
    rows_per_task: int = 256  # most images per Ray task: large enough to amortise scheduling
    parallelism: int = 0  # concurrent decode tasks; 0 = one per CPU Ray can see

    def validate(self) -> None:
        if not self.data:
            raise ConfigError("prep.data: give the data folder with --data DIR")
        if not self.out:
            raise ConfigError("prep.out: give the output folder with --out DIR")
        if self.split != "official":
            if len(self.ratios) not in (2, 3):
                raise ConfigError(
                    f"prep.ratios: give 2 (train,test) or 3 (train,val,test) ratios, got {list(self.ratios)}"
                )
            if any(r <= 0 for r in self.ratios) or not math.isclose(sum(self.ratios), 1.0, abs_tol=1e-6):
                raise ConfigError(
                    f"prep.ratios: each ratio must be > 0 and they must sum to 1, got {list(self.ratios)} "
                    f"(sum {sum(self.ratios):g})"
                )
        if not 16 <= self.image_size <= 1024:
            raise ConfigError(f"prep.image_size: must be between 16 and 1024 px, got {self.image_size}")
        if self.rows_per_task < 1:
            raise ConfigError("prep.rows_per_task: must be >= 1")
        if self.parallelism < 0:
            raise ConfigError("prep.parallelism: must be >= 0 (0 = automatic)")
