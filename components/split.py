"""Step 3: the deterministic stratified train/test split with k folds."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def split(cohort: Input[Dataset], params: Input[Artifact], split_table: Output[Dataset]):
    """Write split.csv (case_id, label, subset, fold)."""
    from pathlib import Path

    from deepsc.config import load_params
    from deepsc.data.split import make_split

    table = make_split(Path(cohort.path) / "manifest.csv", Path(split_table.path), load_params(params.path))
    split_table.metadata.update({f"n_{k}": int(v) for k, v in table["subset"].value_counts().items()})
