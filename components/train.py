"""Steps 5-7: pre-train the segmentation path, the classification path, then fine-tune jointly."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def pretrain_seg(preprocessed: Input[Dataset], split_table: Input[Dataset], params: Input[Artifact], model: Output[Model]):
    """Stage 1a: inception(seg) + lesion subnet, Dice + focal loss."""
    from pathlib import Path

    from deepsc.config import load_params
    from deepsc.train.stages import train_stage

    train_stage("pretrain-seg", Path(preprocessed.path), Path(split_table.path), Path(model.path), load_params(params.path))
    model.metadata.update({"stage": "pretrain-seg", "framework": "pytorch"})


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def pretrain_cls(preprocessed: Input[Dataset], split_table: Input[Dataset], params: Input[Artifact], seg_init: Input[Model],
                 model: Output[Model]):
    """Stage 1b: inception(cls) + classification subnet, class-weighted cross-entropy (``seg_init``
    is read with ``train.pretrain_cls.lesion_context: predicted``)."""
    from pathlib import Path

    from deepsc.config import load_params
    from deepsc.train.stages import train_stage

    train_stage("pretrain-cls", Path(preprocessed.path), Path(split_table.path), Path(model.path), load_params(params.path),
                init_from={"seg": Path(seg_init.path)})
    model.metadata.update({"stage": "pretrain-cls", "framework": "pytorch"})


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def finetune(
    preprocessed: Input[Dataset],
    split_table: Input[Dataset],
    params: Input[Artifact],
    seg_init: Input[Model],
    cls_init: Input[Model],
    model: Output[Model],
):
    """Stage 2: all three subnets jointly from both stage-1 models, total loss with the task-aware term."""
    from pathlib import Path

    from deepsc.config import load_params
    from deepsc.train.stages import train_stage

    train_stage("finetune", Path(preprocessed.path), Path(split_table.path), Path(model.path), load_params(params.path),
                init_from={"seg": Path(seg_init.path), "cls": Path(cls_init.path)})
    model.metadata.update({"stage": "finetune", "framework": "pytorch"})
