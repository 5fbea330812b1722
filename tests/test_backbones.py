"""timm models: names, pretrained weights from every source (offline: files the tests write and serve on
127.0.0.1), input handling, fine-tuning (groups, freezing) and per-image photo augmentation.

Real timm architectures with random weights stand in for published ones: this machine cannot download those.
test_resnet and test_vit are timm's own tiny test networks (0.4M parameters), fast enough for a unit test.
"""

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
from conftest import TINY_MODEL_CONFIG, learnable_images
from safetensors.torch import save_file

from image_classifier import backbones, optim
from image_classifier.augment import ALL_OPS, COLOUR_OPS, _colour, photo_augment
from image_classifier.data import Split
from image_classifier.errors import UserError
from image_classifier.models import build_model, model_config
from image_classifier.optim import make_optimizer, parameter_groups, set_backbone_trainable
from image_classifier.plan import plan_training
from image_classifier.train import train

# bf16 on an AMX CPU is not bit-reproducible for these tiny images: oneDNN's bf16 kernels gave different weight
# gradients in identical runs, and now and then a NaN, for convolutions whose output is 1x1 (oneDNN #5717).
PRECISION = "fp32"


@pytest.fixture(autouse=True)
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test downloads into its own cache and never reaches the internet."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("IMAGE_CLASSIFIER_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def weights_file(path: Path, architecture: str = "test_resnet", seed: int = 0) -> dict[str, torch.Tensor]:
    """A real timm network's random weights, saved as timm publishes them (ImageNet's 1000 classes)."""
    torch.manual_seed(seed)
    state = timm.create_model(architecture, pretrained=False).state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return state


def config(model: str = "timm:test_resnet", channels: int = 3, size: int = 32) -> dict:
    return {
        **TINY_MODEL_CONFIG,
        "model": model,
        "width": 0,
        "image_shape": [channels, size, size],
        "mean": [0.5] * channels,
        "std": [0.25] * channels,
        "model_kwargs": backbones.model_kwargs(model, size),
    }


# --- names ------------------------------------------------------------------------------------------------------


def test_an_unknown_architecture_names_the_closest_ones() -> None:
    with pytest.raises(UserError, match=r"timm has no architecture 'resnet19'; closest: .*resnet18"):
        backbones.check_architecture("timm:resnet19")
    backbones.check_architecture("timm:resnet18.a1_in1k")  # a tag picks one of its published weights


def test_the_image_size_comes_from_the_architecture() -> None:
    assert backbones.input_size("timm:resnet18") == 224
    assert backbones.input_size("timm:test_vit") == 160
    assert backbones.model_kwargs("timm:test_vit", 32) == {"img_size": 32}  # a ViT is built for our size
    assert backbones.model_kwargs("timm:resnet18", 32) == {}


# --- weights from each source -----------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_local_file_loads_with_a_new_classifier_and_its_sha256(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"weights{suffix}"
    state = weights_file(path)
    weights = backbones.resolve_weights(str(path), "timm:test_resnet")
    assert weights.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert weights.sha256 in weights.line()
    model = build_model(config(), weights)
    loaded = model.network.state_dict()
    assert torch.equal(loaded["conv1.0.weight"], state["conv1.0.weight"])
    assert loaded["fc.weight"].shape == (len(TINY_MODEL_CONFIG["classes"]), state["fc.weight"].shape[1])


def test_grey_images_adapt_the_first_convolution(tmp_path: Path) -> None:
    state = weights_file(tmp_path / "w.safetensors")
    weights = backbones.resolve_weights(str(tmp_path / "w.safetensors"), "timm:test_resnet")
    model = build_model(config(channels=1), weights)
    stem = model.network.state_dict()["conv1.0.weight"]
    assert stem.shape[1] == 1
    # timm's adapt_input_conv: the RGB filters summed, so a grey image gives the response its RGB copy would.
    assert torch.allclose(stem, state["conv1.0.weight"].sum(1, keepdim=True))
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, len(TINY_MODEL_CONFIG["classes"]))


def test_a_vit_loads_weights_made_for_another_image_size(tmp_path: Path) -> None:
    weights_file(tmp_path / "vit.safetensors", "test_vit")  # position embeddings for 160 pixels
    weights = backbones.resolve_weights(str(tmp_path / "vit.safetensors"), "timm:test_vit")
    model = build_model(config("timm:test_vit"), weights)  # resized by timm's filter for 32
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, len(TINY_MODEL_CONFIG["classes"]))


def test_weights_of_another_architecture_fail_in_one_line_naming_the_mismatch(tmp_path: Path) -> None:
    weights_file(tmp_path / "vit.safetensors", "test_vit")
    weights = backbones.resolve_weights(str(tmp_path / "vit.safetensors"), "timm:test_resnet")
    with pytest.raises(UserError) as caught:
        build_model(config(), weights)
    message = str(caught.value)
    assert "\n" not in message and "does not fit timm:test_resnet: missing conv1.0.weight" in message
    assert "unexpected" in message


def test_a_file_of_the_right_names_but_other_shapes_names_them(tmp_path: Path) -> None:
    state = weights_file(tmp_path / "w.safetensors")
    state["conv1.0.weight"] = torch.zeros(5, 3, 3, 3)
    save_file(state, str(tmp_path / "w.safetensors"))
    weights = backbones.resolve_weights(str(tmp_path / "w.safetensors"), "timm:test_resnet")
    with pytest.raises(UserError, match=r"conv1.0.weight is \[5, 3, 3, 3\] in the file, \[.*\] in the model"):
        build_model(config(), weights)


def test_a_pickle_with_code_is_refused_not_run(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"model": torch.nn.Linear(2, 2)}, path)  # a module object: unpickling would run its class code
    # Refused when resolved: reading its keys (which layout they are in) already loads it with weights_only.
    with pytest.raises(UserError, match="refusing to unpickle it"):
        backbones.resolve_weights(str(path), "timm:test_resnet")


def test_a_missing_path_is_named(tmp_path: Path) -> None:
    with pytest.raises(
        UserError, match=r"train.pretrained = '.*nothing.safetensors': no such file or folder"
    ):
        backbones.resolve_weights(str(tmp_path / "nothing.safetensors"), "timm:test_resnet")


def test_timms_local_dir_layout_brings_its_normalisation(tmp_path: Path) -> None:
    folder = tmp_path / "local"
    state = weights_file(folder / "model.safetensors")
    pretrained_cfg = {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6], "input_size": [3, 160, 160]}
    (folder / "config.json").write_text(
        json.dumps({"architecture": "test_resnet", "num_classes": 1000, "pretrained_cfg": pretrained_cfg})
    )
    weights = backbones.resolve_weights(str(folder), "timm:test_resnet")
    assert weights.file == folder / "model.safetensors"
    assert backbones.normalisation("timm:test_resnet", weights, 3) == ([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])
    mean, std = backbones.normalisation("timm:test_resnet", weights, 1)
    assert (mean, std) == ([pytest.approx(0.2)], [pytest.approx(0.5)])
    model = build_model(config(), weights)
    assert torch.equal(model.network.state_dict()["conv1.0.weight"], state["conv1.0.weight"])
    with pytest.raises(UserError, match="holds weights for 'test_resnet', not 'test_vit'"):
        backbones.resolve_weights(str(folder), "timm:test_vit")


def hub_cache(cache: Path, repo_id: str, files: dict[str, bytes]) -> None:
    """The Hugging Face cache's layout, as `huggingface-cli download` leaves it on a machine with internet."""
    commit = "0" * 40
    repo = cache / "huggingface" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for name, data in files.items():
        (repo / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
        (repo / "snapshots" / commit / name).write_bytes(data)


def test_default_weights_are_reused_from_the_cache_offline(tmp_path: Path, offline_cache: Path) -> None:
    weights_file(tmp_path / "w.safetensors")
    hub_id = backbones.default_config("timm:test_resnet")["hf_hub_id"]  # where timm downloads them from
    hub_cache(offline_cache, hub_id, {"model.safetensors": (tmp_path / "w.safetensors").read_bytes()})
    weights = backbones.resolve_weights("default", "timm:test_resnet")
    assert weights.source == f"hf-hub:{hub_id}"
    assert weights.sha256 == hashlib.sha256((tmp_path / "w.safetensors").read_bytes()).hexdigest()
    assert backbones.normalisation("timm:test_resnet", weights, 3)[0] == list(
        timm.models.get_pretrained_cfg("test_resnet").mean
    )


def test_a_hub_id_missing_from_the_cache_offline_says_how_to_fetch_it(offline_cache: Path) -> None:
    with pytest.raises(UserError, match=r"hf-hub:someone/model is not in the cache .*`make pretrained"):
        backbones.resolve_weights("hf-hub:someone/model", "timm:test_resnet")


def test_a_url_downloads_once_and_checks_the_hash_in_its_name(
    tmp_path: Path, server: SimpleNamespace, offline_cache: Path
) -> None:
    base, served = server.url, server.root
    weights_file(tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    name = f"test_resnet-{hashlib.sha256(data).hexdigest()[:8]}.safetensors"  # torch.hub's naming
    (served / name).write_bytes(data)
    weights = backbones.resolve_weights(f"{base}/{name}", "timm:test_resnet")
    assert weights.file.parent.parent == offline_cache and weights.file.read_bytes() == data
    assert backbones.resolve_weights(f"{base}/{name}", "timm:test_resnet").sha256 == weights.sha256
    assert server.requests == [f"/{name}"]  # the second time, the cache served
    build_model(config(), weights)


def test_a_corrupted_download_is_refused_and_not_kept(
    tmp_path: Path, server: SimpleNamespace, offline_cache: Path
) -> None:
    base, served = server.url, server.root
    weights_file(tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    name = f"test_resnet-{hashlib.sha256(data).hexdigest()[:8]}.safetensors"
    (served / name).write_bytes(data[:-100] + bytes(100))  # damaged on the way
    with pytest.raises(UserError, match=rf"{name} is corrupted"):
        backbones.resolve_weights(f"{base}/{name}", "timm:test_resnet")
    assert not list(offline_cache.rglob("*.safetensors"))
    # A cached copy damaged later is refused too, on every use.
    cached = offline_cache / "torch" / name
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(data[:-1] + b"x")
    with pytest.raises(UserError, match=r"is corrupted: its sha256 .* does not begin with"):
        backbones.resolve_weights(f"{base}/{name}", "timm:test_resnet")


def test_an_unreachable_url_fails_in_one_line(server: SimpleNamespace) -> None:
    base = server.url
    with pytest.raises(UserError, match=r"cannot download .*missing-0123abcd.pth: HTTP 404"):
        backbones.resolve_weights(f"{base}/missing-0123abcd.pth", "timm:test_resnet")


def test_the_model_config_takes_the_weights_normalisation(tiny_params, tmp_path: Path) -> None:
    weights_file(tmp_path / "w.safetensors")
    params = tiny_params.train.model_copy(
        update={"model": "timm:test_resnet", "pretrained": str(tmp_path / "w.safetensors")}
    )
    cfg, weights = model_config(params, "folder", [1, 32, 32], ["a", "b"], [0.3], [0.2])
    imagenet = timm.models.get_pretrained_cfg("test_resnet")
    assert cfg["mean"] == [pytest.approx(sum(imagenet.mean) / 3)] and weights is not None
    cfg, weights = model_config(
        params.model_copy(update={"pretrained": ""}), "folder", [1, 32, 32], ["a"], [0.3], [0.2]
    )
    assert (cfg["mean"], weights) == ([0.3], None)  # random weights: the data set's own statistics


# --- fine-tuning ------------------------------------------------------------------------------------------------


def test_fine_tuning_auto_trains_everything_from_the_start_at_the_measured_lr(tiny_params) -> None:
    params = tiny_params.train.model_copy(
        update={"model": "timm:test_resnet", "epochs": 3, "batch_size": 256}
    )
    plan = plan_training(params, 1000, model="timm:test_resnet", pretrained=True)
    assert (plan.optimizer, plan.lr, plan.freeze_epochs, plan.backbone_lr_scale) == ("adamw", 8e-3, 0, 1.0)
    random_start = plan_training(params, 1000, model="timm:test_resnet", pretrained=False)
    assert (random_start.lr, random_start.freeze_epochs, random_start.backbone_lr_scale) == (1e-3, 0, 1.0)
    small = plan_training(params, 1000, image_size=64, model="timm:test_resnet", pretrained=True)
    large = plan_training(params, 1000, image_size=224, model="timm:test_resnet", pretrained=True)
    assert (small.augment, large.augment) == ("basic", "photo")  # a crop of 8% of 64 pixels leaves too little


def test_the_backbone_learns_slower_and_norms_and_biases_get_no_decay(tiny_params) -> None:
    params = tiny_params.train.model_copy(
        update={
            "model": "timm:test_resnet",
            "epochs": 3,
            "batch_size": 16,
            "lr": 1e-3,
            "freeze_epochs": 1,
            "backbone_lr_scale": 0.1,
        }
    )
    plan = plan_training(params, 100, model="timm:test_resnet", pretrained=True)
    assert (plan.optimizer, plan.lr, plan.freeze_epochs, plan.backbone_lr_scale) == ("adamw", 1e-3, 1, 0.1)
    model = build_model(config())
    groups = parameter_groups(model, plan)
    head = {id(p) for p in model.network.get_classifier().parameters()}
    for group in groups:
        assert group["lr"] == pytest.approx(1e-4 if group["backbone"] else 1e-3)
        assert all((id(p) in head) != group["backbone"] for p in group["params"])
        assert all((p.ndim > 1) == (group["weight_decay"] > 0) for p in group["params"])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_freezing_stops_gradients_at_the_classifier(tiny_params) -> None:
    params = tiny_params.train.model_copy(update={"model": "timm:test_resnet"})
    plan = plan_training(params, 100, model="timm:test_resnet", pretrained=True)
    model = build_model(config())
    optimizer = make_optimizer(params, plan, model)
    set_backbone_trainable(optimizer, False)
    model(torch.rand(4, 3, 32, 32)).sum().backward()
    assert model.network.get_classifier().weight.grad is not None
    assert model.network.conv1[0].weight.grad is None


def tiny_photos(size: int, seed: int) -> Split:
    labels = torch.arange(size) % 10
    grey = learnable_images(labels, seed)[:, :16, :16]
    return Split(grey.unsqueeze(1).expand(-1, 3, -1, -1).contiguous(), labels)


def fine_tune_setup(tiny_params, tmp_path: Path, **train: object) -> tuple[dict, backbones.Weights, object]:
    """A weights file for timm:test_resnet, those weights resolved, and train params that fine-tune from them
    in batches of 32 with `train` changed: (the file's tensors, the weights, the params)."""
    path = tmp_path / "w.safetensors"
    state = weights_file(path)
    weights = backbones.resolve_weights(str(path), "timm:test_resnet")
    update = {"model": "timm:test_resnet", "pretrained": str(path), "batch_size": 32, **train}
    return state, weights, tiny_params.train.model_copy(update=update)


def test_a_frozen_epoch_trains_only_the_classifier_then_everything(tiny_params, tmp_path: Path) -> None:
    state, weights, params = fine_tune_setup(
        tiny_params, tmp_path, epochs=1, freeze_epochs=1, precision=PRECISION
    )
    cfg = config(size=16)
    split, val = tiny_photos(128, 1), tiny_photos(40, 2)
    frozen = train(params, cfg, split, val, torch.device("cpu"), tmp_path / "a.pt", pretrained=weights)
    assert torch.equal(frozen.best_state["network.conv1.0.weight"], state["conv1.0.weight"])
    unfrozen = train(
        params.model_copy(update={"freeze_epochs": 0}),
        cfg,
        split,
        val,
        torch.device("cpu"),
        tmp_path / "b.pt",
        pretrained=weights,
    )
    assert not torch.equal(unfrozen.best_state["network.conv1.0.weight"], state["conv1.0.weight"])
    assert not torch.equal(frozen.best_state["network.fc.weight"], unfrozen.best_state["network.fc.weight"])


def test_early_stages_keep_their_pretrained_weights_and_leave_the_optimiser(
    tiny_params, tmp_path: Path
) -> None:
    # test_resnet's feature stages: act1 (the stem), layer1, ..., layer4
    state, weights, params = fine_tune_setup(tiny_params, tmp_path, epochs=1, frozen_stages=2)
    plan = plan_training(params, 128, model="timm:test_resnet", pretrained=True)
    assert plan.frozen_stages == 2
    assert plan_training(params, 128, model="convnet").frozen_stages == 0  # ours: no pretrained stages
    model = build_model(config())
    frozen = optim.freeze_early_stages(model, plan.frozen_stages)
    trained = {id(p) for group in make_optimizer(params, plan, model).param_groups for p in group["params"]}
    names = [name for name, p in model.network.named_parameters() if id(p) not in trained]
    assert len(names) == frozen > 0 and all(name.startswith(("conv1", "bn1", "layer1.")) for name in names)
    with pytest.raises(UserError, match="frozen_stages = 5: the network has 5 stages"):
        optim.freeze_early_stages(build_model(config()), 5)

    result = train(
        params.model_copy(update={"precision": PRECISION}),
        config(size=16),
        tiny_photos(128, 1),
        tiny_photos(40, 2),
        torch.device("cpu"),
        tmp_path / "a.pt",
        pretrained=weights,
    )
    best = result.best_state
    for name in ("conv1.0.weight", "layer1.0.conv1.weight"):
        assert torch.equal(best[f"network.{name}"], state[name])
    assert not torch.equal(best["network.layer2.0.conv1.weight"], state["layer2.0.conv1.weight"])
    # Weights frozen, statistics not: batch norm in a frozen stage still follows the new images.
    assert not torch.equal(best["network.layer1.0.bn1.running_mean"], state["layer1.0.bn1.running_mean"])


def test_a_timm_model_resumes_bit_identically_across_the_unfreezing(tiny_params, tmp_path: Path) -> None:
    _, weights, params = fine_tune_setup(
        tiny_params, tmp_path, epochs=3, mixup=0.4, freeze_epochs=1, precision=PRECISION
    )
    args = (params, config(size=16), tiny_photos(96, 1), tiny_photos(30, 2), torch.device("cpu"))
    whole = train(*args, tmp_path / "a.pt", pretrained=weights)

    def stop_after_first(stats: dict[str, float]) -> None:
        if stats["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(*args, tmp_path / "b.pt", on_epoch=stop_after_first, pretrained=weights)
    resumed = train(*args, tmp_path / "b.pt", pretrained=weights)
    for key, value in whole.final_checkpoint["model"].items():
        assert torch.equal(value, resumed.final_checkpoint["model"][key]), key


# --- photo augmentation -----------------------------------------------------------------------------------------


def test_photo_augmentation_draws_per_image_and_repeats_with_the_seed(tiny_params) -> None:
    params = tiny_params.train.model_copy(update={"random_erasing": 0.5})
    images = torch.randint(0, 256, (1, 3, 24, 24), dtype=torch.uint8).expand(64, -1, -1, -1).contiguous()
    out = photo_augment(images, params, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    distinct = {tuple(image.flatten().tolist()) for image in out}
    assert len(distinct) == len(images)  # 64 copies of one image, 64 different results
    assert torch.equal(out, photo_augment(images, params, torch.Generator().manual_seed(0)))


def test_each_colour_operation_changes_only_the_images_that_drew_it() -> None:
    images = torch.rand(len(ALL_OPS), 3, 12, 12)
    ops = torch.arange(len(ALL_OPS))  # image i draws operation i
    out = _colour(images.clone(), ops, torch.full((len(ops),), 0.8), torch.ones(len(ops)))
    for i, name in enumerate(ALL_OPS):
        changed = not torch.equal(out[i], images[i])
        assert changed == (name in COLOUR_OPS), name
    posterized = out[ALL_OPS.index("posterize")] * 255
    assert torch.allclose(
        posterized, (posterized / 32).round() * 32, atol=1e-3
    )  # 8 - round(0.8 * 6) = 3 bits


def test_a_timm_model_warm_starts_from_an_earlier_one_with_other_classes(tmp_path: Path) -> None:
    from image_classifier.warm_start import load_initial_weights

    earlier = build_model({**config(), "classes": ["a", "b", "c"]})
    torch.save(earlier.state_dict(), tmp_path / "earlier.pt")
    model, report = load_initial_weights(config(), tmp_path / "earlier.pt")
    assert torch.equal(model.network.conv1[0].weight, earlier.network.conv1[0].weight)
    assert "network.fc.weight" in " ".join(report.skipped)  # 3 classes there, 10 here: a fresh classifier
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, len(TINY_MODEL_CONFIG["classes"]))


@pytest.mark.parametrize("model", ["timm:test_vit", "timm:test_efficientnet", "timm:test_convnext"])
def test_other_families_export_to_onnx_and_torch_export_with_parity(tmp_path: Path, model: str) -> None:
    from image_classifier.export import example_input, export_onnx, export_program, onnx_parity

    cfg = config(model)
    network = build_model(cfg).eval()
    example = example_input(cfg)
    export_onnx(network, example, tmp_path / "m.onnx", 18)
    export_program(network, example, tmp_path / "m.pt2")
    images = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)  # batches of 16 and 4: dynamic batch
    parity = onnx_parity(
        tmp_path / "m.onnx", network, images, batch_size=16, labels=torch.zeros(20, dtype=torch.long)
    )
    assert parity["onnx_max_abs_logit_diff"] <= 1e-4 and parity["onnx_checked_images"] == 20
    program = torch.export.load(tmp_path / "m.pt2").module()
    assert torch.allclose(program(images[:3].float() / 255), network(images[:3].float() / 255), atol=1e-5)
