"""Step 4: window, lung mask, resample; classification input and patch grid per case."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def preprocess(cohort: Input[Dataset], params: Input[Artifact], preprocessed: Output[Dataset]):
    """Preprocess every case of the cohort into the documented per-case arrays."""
    from pathlib import Path

    import pandas as pd

    from deepsc.config import load_params
    from deepsc.data.preprocess import preprocess_cohort

    index = preprocess_cohort(Path(cohort.path) / "manifest.csv", Path(preprocessed.path), load_params(params.path))
    preprocessed.metadata["cases"] = len(pd.read_csv(index))
