"""Step 9: register the model in MLflow and promote it by aliases (champion / challenger)."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Model

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register(model: Input[Model], evaluation: Input[Artifact], params: Input[Artifact]) -> str:
    """Log the pyfunc, register a new version of `deepsc-covid`, apply the promotion gate."""
    from pathlib import Path

    from deepsc.config import load_params
    from deepsc.registry import register_model

    result = register_model(Path(model.path), Path(evaluation.path), load_params(params.path))
    return f"{result.model_name} v{result.version}: {result.alias}"
