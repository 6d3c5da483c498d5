"""DeepSC network: shapes, configuration, cross-stitch, evidence, whole-scan inference and proof
that the joint learning is real (gradients cross between the tasks)."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from deepsc.errors import ConfigError, InputError  # noqa: E402
from deepsc.model.blocks import Inception3d, plain_stem  # noqa: E402
from deepsc.model.losses import LossConfig, total_loss  # noqa: E402
from deepsc.model.network import DeepSC, ModelConfig  # noqa: E402

PATCH = (8, 32, 32)
CLS = (16, 32, 32)


def tiny_config(**overrides) -> ModelConfig:
    settings = dict(
        patch_size=PATCH, cls_shape=CLS, seg_widths=(8, 8, 16, 16), cls_widths=(8, 8, 16), norm_groups=2
    )
    settings.update(overrides)
    return ModelConfig(**settings)


def tiny_model(seed: int = 0, **overrides) -> DeepSC:
    torch.manual_seed(seed)
    return DeepSC(tiny_config(**overrides))


def tiny_batch(batch_size: int = 2, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    lesion = torch.zeros(batch_size, 1, *PATCH)
    lesion[:, :, 2:6, 8:20, 10:24] = 1.0
    boxes = torch.tensor([[0.0, 0.0, 0.0, 0.5, 0.5, 0.5], [0.25, 0.5, 0.5, 0.75, 1.25, 1.25]])
    return {
        "cls": torch.rand(batch_size, 1, *CLS, generator=gen),
        "patch": torch.rand(batch_size, 1, *PATCH, generator=gen),
        "box": boxes[:batch_size],
        "label": torch.tensor([0, 1])[:batch_size],
        "lesion": lesion,
        "has_mask": torch.ones(batch_size, dtype=torch.bool),
    }


def run(model: DeepSC, batch: dict, task: str = "joint") -> dict:
    return model(batch["cls"], batch["patch"], batch["box"], task=task, target=batch["label"])


def grads(model: DeepSC, loss: torch.Tensor) -> dict[str, torch.Tensor | None]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def nonzero(grad: torch.Tensor | None) -> bool:
    return grad is not None and bool(grad.abs().sum() > 0)


# ------------------------------------------------------------------ configuration
def test_config_from_params_default_and_paper(params):
    from deepsc.config import load_params
    from conftest import REPO_ROOT

    default = ModelConfig.from_params(params)
    assert default.patch_size == tuple(params["preprocess"]["patch_size"])
    assert default.cls_shape == (params["preprocess"]["cls_slices"], *params["preprocess"]["cls_size"])
    paper = ModelConfig.from_params(load_params(REPO_ROOT / "params.yaml", "paper"))
    assert paper.patch_size == (24, 256, 256) and paper.cls_shape == (48, 256, 256)
    assert paper.seg_widths == (32, 64, 128, 256) and paper.cls_widths == (64, 128, 256)


def test_config_round_trips_through_json():
    cfg = tiny_config(inception=False, cross_stitch_init=(0.8, 0.2))
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"patch_size": (12, 32, 32)}, "multiples of 8"),
        ({"cls_shape": (8, 32, 32)}, "multiples of 16"),
        ({"seg_widths": (12, 16, 16, 16)}, "multiple of 8"),
        ({"norm_groups": 3}, "divisible by norm_groups"),
        ({"seg_widths": (8, 8, 8)}, "4 positive integers"),
        ({"seg_eta": (0, 0, 0, 0)}, "seg_eta"),
        ({"cross_stitch": "yes"}, "true or false"),
    ],
)
def test_config_rejects_bad_settings(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(**overrides)


def test_config_rejects_unknown_model_key(params):
    params["model"]["dropout"] = 0.1
    with pytest.raises(ConfigError, match="dropout"):
        ModelConfig.from_params(params)


# ------------------------------------------------------------------ blocks
def test_inception_block_branch_spec_and_stride():
    block = Inception3d(1, 32)
    assert [block.branch1.out_channels, block.branch2[-1].out_channels, block.branch3[-1].out_channels] == [8, 8, 12]
    assert block.branch4[-1].out_channels == 4 and block.norm.num_groups == 2
    assert block.branch1.stride == block.branch2[-1].stride == block.branch3[2].stride == (2, 2, 2)
    out = block(torch.rand(1, 1, 8, 16, 16))
    assert out.shape == (1, 32, 4, 8, 8) and bool((out >= 0).all())
    stem = plain_stem(1, 32)
    assert stem(torch.rand(1, 1, 8, 16, 16)).shape == (1, 32, 4, 8, 8) and stem[0].kernel_size == (3, 3, 3)
    with pytest.raises(ValueError, match="multiple of 8"):
        Inception3d(1, 20)


# ------------------------------------------------------------------ forward
def test_joint_forward_shapes():
    model, batch = tiny_model(), tiny_batch()
    out = run(model, batch)
    assert out["seg_logit"].shape == (2, 1, *PATCH)
    assert [tuple(s.shape[2:]) for s in out["seg_side"]] == [(1, 4, 4), (2, 8, 8), (4, 16, 16), PATCH]
    assert out["cls_logit"].shape == (2, 3)
    assert [tuple(v.shape) for v in out["evidence"]] == [tuple(s.shape) for s in out["seg_side"][:3]]
    assert [tuple(c.shape[2:]) for c in out["cams"]] == [(4, 8, 8), (2, 4, 4), (1, 2, 2)]
    for v in out["evidence"]:
        assert float(v.detach().min()) >= 0.0 and float(v.detach().max()) <= 1.0 + 1e-6
    assert out["cam_class"].tolist() == [0, 1]


def test_seg_and_cls_tasks_run_only_their_path():
    model, batch = tiny_model(), tiny_batch()
    seg = run(model, batch, "seg")
    assert seg["seg_logit"].shape == (2, 1, *PATCH) and seg["cls_logit"] is None and seg["evidence"] == []
    cls = model(batch["cls"], None, None, task="cls")
    assert cls["seg_logit"] is None and cls["cls_logit"].shape == (2, 3) and cls["evidence"] == []
    assert len(run(model, batch, "cls")["evidence"]) == 3  # with a box the cls path can show evidence
    with pytest.raises(ValueError, match="task"):
        run(model, batch, "both")
    with pytest.raises(ValueError, match="multiples of 8"):
        model(batch["cls"], torch.rand(2, 1, 12, 32, 32), batch["box"])


def test_seg_task_bypasses_the_cross_stitch():
    model, batch = tiny_model(), tiny_batch()
    a = run(model, batch, "seg")["seg_logit"]
    batch["cls"] = torch.rand_like(batch["cls"])
    torch.testing.assert_close(run(model, batch, "seg")["seg_logit"], a)


def test_cls_logit_is_gap_of_the_cams():
    """Eq. 4/5 share the FC weights: grid means of the per-unit CAMs add up to the logit."""
    model, batch = tiny_model(), tiny_batch()
    out = run(model, batch)
    total = sum(c.mean(dim=(1, 2, 3, 4)) for c in out["cams"]) + model.classifier.fc.bias[out["cam_class"]]
    torch.testing.assert_close(total, out["cls_logit"].gather(1, out["cam_class"][:, None])[:, 0])


def test_evidence_follows_the_target_class():
    model, batch = tiny_model(), tiny_batch()
    a = run(model, batch)["evidence"][2]
    batch["label"] = torch.tensor([2, 2])
    assert not torch.allclose(a, run(model, batch)["evidence"][2])


def test_cross_stitch_weights_are_initialised_explicitly():
    model = tiny_model(cross_stitch_init=(0.7, 0.3))
    cs = model.cross_stitch
    weights = [cs.w_seg1.item(), cs.w_cls2.item(), cs.w_seg2.item(), cs.w_cls1.item()]
    assert weights == pytest.approx([0.7, 0.3, 0.3, 0.7])
    assert len(model.cross_stitch_parameters()) == 4
    off = tiny_model(cross_stitch=False)
    assert off.cross_stitch is None and off.cross_stitch_parameters() == []


def test_parameter_groups_partition_the_model():
    model = tiny_model()
    groups = [model.seg_parameters(), model.cls_parameters(), model.cross_stitch_parameters()]
    ids = [id(p) for group in groups for p in group]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_forward_is_deterministic_with_a_seed():
    batch = tiny_batch()
    a, b = run(tiny_model(seed=3), batch), run(tiny_model(seed=3), batch)
    torch.testing.assert_close(a["seg_logit"], b["seg_logit"])
    torch.testing.assert_close(a["cls_logit"], b["cls_logit"])
    assert not torch.allclose(a["cls_logit"], run(tiny_model(seed=4), batch)["cls_logit"])


def test_inception_ablation_builds_plain_stems():
    model = tiny_model(inception=False)
    assert not isinstance(model.seg_stem, Inception3d) and not isinstance(model.cls_stem, Inception3d)
    assert run(model, tiny_batch())["cls_logit"].shape == (2, 3)


def test_paper_size_model_constructs():
    cfg = ModelConfig(
        patch_size=(24, 256, 256),
        cls_shape=(48, 256, 256),
        seg_widths=(32, 64, 128, 256),
        cls_widths=(64, 128, 256),
        norm_groups=8,
    )
    model = DeepSC(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    assert 5_000_000 < n_params < 20_000_000
    assert cfg.side_shapes() == [(3, 32, 32), (6, 64, 64), (12, 128, 128), (24, 256, 256)]


# ------------------------------------------------------------------ joint learning is real
def test_every_parameter_gets_a_gradient_in_joint_mode():
    model, batch = tiny_model(), tiny_batch()
    g = grads(model, total_loss(run(model, batch), batch, LossConfig())["total"])
    missing = [name for name, grad in g.items() if not nonzero(grad)]
    assert missing == []
    assert all(nonzero(g[f"cross_stitch.{w}"]) for w in ("w_seg1", "w_cls2", "w_seg2", "w_cls1"))


def test_task_aware_loss_reaches_both_subnets():
    model, batch = tiny_model(), tiny_batch()
    with_ta = grads(model, total_loss(run(model, batch), batch, LossConfig(lambda_ta=10.0))["total"])
    without = grads(model, total_loss(run(model, batch), batch, LossConfig(lambda_ta=0.0))["total"])
    for prefix in ("lesion.", "seg_stem.", "classifier.units.", "classifier.fc.", "cls_stem."):
        changed = [n for n in with_ta if n.startswith(prefix) and not torch.allclose(with_ta[n], without[n])]
        assert changed, f"the task-aware loss did not change any gradient under {prefix}"


def test_seg_loss_reaches_the_classification_stem_only_through_the_cross_stitch():
    """What the network docstring claims: the seg loss trains the classification path's stem (via
    the cross-stitch) but not its encoder units or FC layer (only the task-aware loss does)."""
    model, batch = tiny_model(), tiny_batch()
    g = grads(model, total_loss(run(model, batch), batch, LossConfig())["seg"])
    reached = {prefix: any(nonzero(grad) for name, grad in g.items() if name.startswith(prefix))
               for prefix in ("cls_stem.", "classifier.units.", "classifier.fc.")}
    assert reached == {"cls_stem.": True, "classifier.units.": False, "classifier.fc.": False}
    off = tiny_model(cross_stitch=False)
    g = grads(off, total_loss(run(off, batch), batch, LossConfig())["seg"])
    assert not any(nonzero(grad) for name, grad in g.items() if name.startswith(("cls_stem.", "classifier.")))


def test_lambda_ta_zero_gives_exactly_the_loss_without_the_term():
    model, batch = tiny_model(), tiny_batch()
    cfg = LossConfig(lambda_ta=0.0)
    parts = total_loss(run(model, batch), batch, cfg)
    assert parts["ta"].item() > 0  # the term exists, it is just not weighted in
    g_total = grads(model, parts["total"])
    parts = total_loss(run(model, batch), batch, cfg)
    g_manual = grads(model, cfg.lambda_seg * parts["seg"] + cfg.lambda_cls * parts["cls"])
    for name in g_total:
        assert torch.equal(g_total[name], g_manual[name]), name


def test_cross_stitch_carries_each_task_loss_into_the_other_path():
    batch = tiny_batch()
    on = tiny_model()
    g_on = grads(on, total_loss(run(on, batch), batch, LossConfig())["seg"])
    assert nonzero(g_on["cls_stem.branch1.weight"])  # seg loss shapes the cls features
    off = tiny_model(cross_stitch=False)
    g_off = grads(off, total_loss(run(off, batch), batch, LossConfig())["seg"])
    assert all(not nonzero(g_off[n]) for n in g_off if n.startswith(("cls_stem.", "classifier.")))
    # without the cross-stitch the cls loss reaches the seg path only through S_hat ...
    g_cls = grads(off, total_loss(run(off, batch), batch, LossConfig())["cls"])
    assert nonzero(g_cls["seg_stem.branch1.weight"]) and nonzero(g_cls["lesion.heads.3.weight"])
    # ... and with S_hat gone (task cls) nothing of it reaches the seg path
    g_cls_only = grads(off, total_loss(run(off, batch, "cls"), batch, LossConfig())["total"])
    assert all(g_cls_only[n] is None for n in g_cls_only if n.startswith(("seg_stem.", "lesion.")))


def test_shat_is_placed_at_the_patch_box():
    """The classifier sees S_hat only inside the patch's box: a box elsewhere changes the logits."""
    model, batch = tiny_model(cross_stitch=False), tiny_batch(batch_size=1)
    a = run(model, batch)["cls_logit"]
    batch["box"] = torch.tensor([[0.5, 0.5, 0.5, 1.0, 1.0, 1.0]])
    assert not torch.allclose(a, run(model, batch)["cls_logit"])


# ------------------------------------------------------------------ whole-scan inference
def test_infer_scan_on_an_odd_shaped_scan():
    model = tiny_model()
    torch.manual_seed(5)
    image = torch.rand(1, 1, 13, 37, 29)
    out = model.infer_scan(torch.rand(1, 1, *CLS), image, chunk_size=3)
    assert out["lesion_prob"].shape == (13, 37, 29)
    assert 0.0 <= out["lesion_prob"].min() and out["lesion_prob"].max() <= 1.0
    assert out["class_prob"].shape == (3,) and abs(float(out["class_prob"].sum()) - 1.0) < 1e-5
    assert out["pred"] == int(out["class_prob"].argmax())
    assert [e.shape for e in out["evidence"]] == [(13, 37, 29)] * 3
    for e in out["evidence"]:
        assert e.min() >= 0.0 and abs(float(e.max()) - 1.0) < 1e-5


def test_infer_scan_matches_forward_when_one_patch_is_the_scan():
    model = tiny_model()
    torch.manual_seed(6)
    cls, image = torch.rand(1, 1, *CLS), torch.rand(1, 1, *PATCH)
    out = model.infer_scan(cls, image)
    with torch.no_grad():
        ref = model(cls, image, torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0, 1.0]]))
    torch.testing.assert_close(torch.from_numpy(out["lesion_prob"]), torch.sigmoid(ref["seg_logit"])[0, 0])
    torch.testing.assert_close(torch.from_numpy(out["class_prob"]), torch.softmax(ref["cls_logit"], 1)[0])


def test_infer_scan_overlap_changes_the_lesion_map_only():
    """Sliding windows refine the lesion map; the classifier still sees the tiles (same class,
    probabilities and evidence), and without the cross-stitch the map is exactly the Gaussian
    blend of the seg path's patches."""
    from deepsc.inference import stitch_patch_predictions

    torch.manual_seed(7)
    cls, image = torch.rand(1, 1, *CLS), torch.rand(1, 1, 17, 40, 33)
    for model in (tiny_model(), tiny_model(cross_stitch=False)):
        plain = model.infer_scan(cls, image, chunk_size=3, overlap=0.0)
        sliding = model.infer_scan(cls, image, chunk_size=3, overlap=0.5)
        assert abs(plain["class_prob"] - sliding["class_prob"]).max() < 1e-5 and plain["pred"] == sliding["pred"]
        for a, b in zip(plain["evidence"], sliding["evidence"]):
            assert abs(a - b).max() < 1e-4
        assert sliding["lesion_prob"].shape == (17, 40, 33)
        assert abs(plain["lesion_prob"] - sliding["lesion_prob"]).max() > 1e-3
    with torch.no_grad():
        blended = stitch_patch_predictions(image[0, 0].numpy(), PATCH, 3,
                                           lambda x: torch.sigmoid(model(None, x, None, task="seg")["seg_logit"]), 0.5)
    assert abs(sliding["lesion_prob"] - blended).max() < 1e-5


def test_infer_scan_chunking_does_not_change_the_result():
    model = tiny_model()
    cls, image = torch.rand(1, 1, *CLS), torch.rand(1, 1, 17, 40, 33)
    a = model.infer_scan(cls, image, chunk_size=1, with_evidence=False)
    b = model.infer_scan(cls, image, chunk_size=8, with_evidence=False)
    assert abs(a["class_prob"] - b["class_prob"]).max() < 1e-5
    assert abs(a["lesion_prob"] - b["lesion_prob"]).max() < 1e-5 and b["evidence"] == []


# ------------------------------------------------------------------ stage weights
def test_load_stage_weights_takes_each_path_from_its_checkpoint(tmp_path):
    seg_model, cls_model, joint = tiny_model(seed=1), tiny_model(seed=2), tiny_model(seed=3)
    torch.save(seg_model.state_dict(), tmp_path / "seg.pt")
    joint.load_stage_weights(tmp_path / "seg.pt", cls_model.state_dict())
    assert torch.equal(joint.lesion.heads[0].weight, seg_model.lesion.heads[0].weight)
    assert torch.equal(joint.seg_stem.branch1.weight, seg_model.seg_stem.branch1.weight)
    assert torch.equal(joint.classifier.fc.weight, cls_model.classifier.fc.weight)
    assert torch.equal(joint.cls_stem.branch1.weight, cls_model.cls_stem.branch1.weight)
    assert joint.cross_stitch.w_seg1.item() == pytest.approx(0.9)


def test_load_stage_weights_rejects_incomplete_or_missing_checkpoints(tmp_path):
    model = tiny_model()
    state = model.state_dict()
    partial = {k: v for k, v in state.items() if not k.startswith("lesion.heads")}
    with pytest.raises(InputError, match="lesion.heads"):
        model.load_stage_weights(partial, state)
    with pytest.raises(InputError, match="not found"):
        model.load_stage_weights(tmp_path / "nope.pt", state)
    other = tiny_model(seg_widths=(16, 8, 16, 16)).state_dict()
    with pytest.raises(InputError, match="shape"):
        model.load_stage_weights(other, state)


# ------------------------------------------------------------------ baselines
def test_baselines_follow_the_input_conventions(params):
    from deepsc.model.baselines import build_cls_baseline, build_seg_baseline

    params["baselines"]["unet_channels"] = [4, 8, 16]
    params["preprocess"]["patch_size"] = list(PATCH)
    unet = build_seg_baseline(params)
    assert unet(torch.rand(1, 1, *PATCH)).shape == (1, 1, *PATCH)
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    params["baselines"]["classifier_width"] = 1.0
    published = count(build_cls_baseline(params))
    params["baselines"]["classifier_width"] = 0.25
    narrow = build_cls_baseline(params)
    assert narrow(torch.rand(1, 1, *CLS)).shape == (1, 3) and count(narrow) < published / 10
    for bad in (0, -1.0, True, "wide"):
        params["baselines"]["classifier_width"] = bad
        with pytest.raises(ConfigError, match="classifier_width"):
            build_cls_baseline(params)
    params["baselines"]["classifier_width"] = 0.25
    params["baselines"]["classifier"] = "densenet121"
    params["preprocess"].update(cls_slices=16, cls_size=[64, 64])
    with pytest.raises(ConfigError, match="resnet18"):
        build_cls_baseline(params)
    params["baselines"]["classifier"] = "vgg"
    with pytest.raises(ConfigError, match="classifier"):
        build_cls_baseline(params)
    params["preprocess"]["patch_size"] = [10, 32, 32]
    with pytest.raises(ConfigError, match="multiples of 4"):
        build_seg_baseline(params)


def test_lesion_context_completes_the_classifier_map_and_keeps_joint_gradients():
    """Teacher forcing outside the patch: the classifier sees a whole-scan lesion map in training,
    while the cls loss still reaches the segmentation path through the patch's S_hat."""
    import torch

    from deepsc.model.network import DeepSC, ModelConfig, _with_context

    pasted = torch.zeros(2, 1, 2, 4, 4)
    pasted[:, :, :, :2] = 0.5
    coverage = torch.zeros(2, 1, 2, 4, 4)
    coverage[:, :, :, :2] = 1.0
    context = torch.ones(2, 1, 4, 8, 8)
    lesion, cover = _with_context(pasted, coverage, context, torch.tensor([True, False]), (2, 4, 4))
    assert torch.allclose(lesion[0, :, :, :2], torch.tensor(0.5)) and torch.allclose(lesion[0, :, :, 2:], torch.tensor(1.0))
    assert torch.allclose(cover[0], torch.tensor(1.0))
    assert torch.equal(lesion[1], pasted[1]) and torch.equal(cover[1], coverage[1]), "unknown mask: nothing filled in"

    torch.manual_seed(0)
    cfg = ModelConfig(cls_shape=(16, 32, 32), patch_size=(8, 32, 32), seg_widths=(8, 8, 16, 16),
                      cls_widths=(8, 8, 16), norm_groups=2)
    net = DeepSC(cfg)
    cls, patch = torch.rand(2, 1, 16, 32, 32), torch.rand(2, 1, 8, 32, 32)
    box = torch.tensor([[0.0, 0.0, 0.0, 0.5, 1.0, 1.0], [0.5, 0.0, 0.0, 1.0, 1.0, 1.0]])
    out = net(cls, patch, box, task="joint", lesion_context=(torch.rand(2, 1, 16, 32, 32) > 0.8).float(),
              context_known=torch.tensor([True, True]))
    torch.nn.functional.cross_entropy(out["cls_logit"], torch.tensor([0, 1])).backward()
    seg_grads = [p.grad for p in net.seg_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert seg_grads, "the classification loss must still reach the segmentation path"
