"""The DeepSC-COVID training pipeline for Kubeflow Pipelines v2.

fetch_data -> validate -> split -> preprocess -> pretrain_seg -> pretrain_cls -> finetune
-> evaluate -> register. Training and evaluation run the CUDA image on a GPU node (accelerator
type and limit, node selector, toleration); every step has CPU and memory requests. Volumes and
models travel as artifacts, never as parameters. Compile with `deepsc pipeline compile`.

fetch_data reads the DVC remote with the keys of the Secret :data:`S3_SECRET` in the run's
namespace (optional: without it, an IAM role / IRSA must grant access) and is never cached: a
recurring run must see what the branch names now (its new artifacts then retrain the rest).
"""

from kfp import dsl, kubernetes

from components.evaluate import evaluate
from components.fetch_data import fetch_data
from components.preprocess import preprocess
from components.register import register
from components.split import split
from components.train import finetune, pretrain_cls, pretrain_seg
from components.validate import validate

PIPELINE_NAME = "deepsc-covid-training"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_NODE_LABEL = ("nvidia.com/gpu.present", "true")
S3_SECRET = "deepsc-dvc-s3"
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION")


def _resources(task: dsl.PipelineTask, cpu: str, memory: str) -> dsl.PipelineTask:
    return task.set_cpu_request(cpu).set_memory_request(memory).set_cpu_limit(cpu).set_memory_limit(memory)


def _on_gpu(task: dsl.PipelineTask, gpus: int = 1) -> dsl.PipelineTask:
    task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(gpus)
    kubernetes.add_node_selector(task, label_key=GPU_NODE_LABEL[0], label_value=GPU_NODE_LABEL[1])
    kubernetes.add_toleration(task, key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")
    return task


@dsl.pipeline(name=PIPELINE_NAME, description="Joint 3D lesion segmentation and explainable COVID-19 classification (DeepSC-COVID)")
def deepsc_pipeline(
    repo_url: str,
    data_version: str = "main",
    profile: str = "default",
    overrides_json: str = "{}",
    mlflow_tracking_uri: str = "",
):
    """Args:
    repo_url: git repository (URL or path) whose data.dvc and params.yaml pin the run.
    data_version: git revision of data.dvc to pull from the repository's DVC (S3) remote.
    profile: params.yaml profile (default | paper | long).
    overrides_json: dotted-key overrides, e.g. '{"loss.lambda_ta": 0}'.
    mlflow_tracking_uri: MLflow server (PostgreSQL + S3 backed); empty = params.yaml's.
    """
    data = _resources(fetch_data(repo_url=repo_url, data_version=data_version, profile=profile,
                                 overrides_json=overrides_json, mlflow_tracking_uri=mlflow_tracking_uri), "1", "2Gi")
    data.set_caching_options(False)
    kubernetes.use_secret_as_env(data, secret_name=S3_SECRET, secret_key_to_env={k: k for k in S3_SECRET_KEYS}, optional=True)
    params = data.outputs["params"]
    gate = _resources(validate(cohort=data.outputs["cohort"], params=params), "2", "8Gi")
    splits = _resources(split(cohort=data.outputs["cohort"], params=params), "1", "1Gi").after(gate)
    prep = _resources(preprocess(cohort=data.outputs["cohort"], params=params), "4", "16Gi").after(gate)
    common = dict(preprocessed=prep.outputs["preprocessed"], split_table=splits.outputs["split_table"], params=params)
    seg = _on_gpu(_resources(pretrain_seg(**common), "8", "32Gi"))
    cls = _on_gpu(_resources(pretrain_cls(seg_init=seg.outputs["model"], **common), "8", "32Gi"))
    joint = _on_gpu(_resources(finetune(seg_init=seg.outputs["model"], cls_init=cls.outputs["model"], **common), "8", "32Gi"))
    evaluation = _on_gpu(_resources(evaluate(cohort=data.outputs["cohort"], model=joint.outputs["model"], **common), "8", "32Gi"))
    _resources(register(model=joint.outputs["model"], evaluation=evaluation.outputs["evaluation"], params=params), "1", "2Gi")
