"""Step 2: the great-expectations gate (fails the run on a blocking check)."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def validate(cohort: Input[Dataset], params: Input[Artifact], report: Output[HTML]):
    """Validate the manifest and every volume; the HTML report names each failing case and check."""
    import shutil
    import tempfile
    from pathlib import Path

    from deepsc.config import load_params
    from deepsc.data.validate import validate_cohort

    with tempfile.TemporaryDirectory() as tmp:
        try:
            validate_cohort(Path(cohort.path) / "manifest.csv", Path(tmp), load_params(params.path))
        finally:
            html = Path(tmp) / "validation.html"
            if html.is_file():
                shutil.copyfile(html, report.path)
