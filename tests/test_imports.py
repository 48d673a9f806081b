"""Bring your own checkpoints: each source model is built from a small random config by its own
library (open_clip's factory; transformers' CLIP classes, offline, no weights), imported with
`r2m import-checkpoint`, and must give the same pooled features and logits as the source — in
torch and after ONNX export."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection
from typer.testing import CliRunner
from fixtures import one_line_error

from r2m.checkpoint import file_sha256, read_meta
from r2m.cli import app
from r2m.config import load_params
from r2m.export.onnx_export import export_checkpoint
from r2m.models.detector import load_detector, register_model_configs
from r2m.serving.model_store import open_session

runner = CliRunner()
ATOL = 1e-5
# width 128 = two 64-wide heads (DeepfakeBench's convention), 32 px in 8 px patches: 17 tokens
HF_TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
               image_size=32, patch_size=8)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def pixels(size: int, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(7))


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Move every weight off its init (LayerNorms are 1/0 at init: a mapping mistake there would hide)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def head_file(path, width: int, outputs: int = 2, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(width, outputs)
    with torch.no_grad():
        head.weight.copy_(torch.randn(outputs, width, generator=gen))
        head.bias.copy_(torch.randn(outputs, generator=gen))
    save_file({"fc.weight": head.weight.detach().clone(), "fc.bias": head.bias.detach().clone()}, str(path))
    return head


def imported(path):
    return load_detector(path, require_head=False).eval()  # nothing but the file and its sidecar (θ0 too)


def hf_vision(act: str, seed: int = 0) -> CLIPVisionModel:
    torch.manual_seed(seed)
    model = CLIPVisionModel(CLIPVisionConfig(**HF_TINY, hidden_act=act)).eval()
    randomize(model, seed)
    return model


# ------------------------------------------------------------------------- open_clip


@pytest.mark.parametrize("layout,quick_gelu,flags", [
    ("whole CLIP", False, ["--act", "gelu", "--heads", "4"]),
    ("visual tower, module. prefix", True, ["--act", "quick_gelu", "--heads", "4"]),
    ("whole CLIP", False, ["--model", "r2m-tiny"]),
])
def test_open_clip_import_matches_source(tmp_path, project, layout, quick_gelu, flags):
    register_model_configs()
    torch.manual_seed(0)
    clip = open_clip.create_model("r2m-tiny", force_quick_gelu=quick_gelu).eval()  # width 128, 32-wide heads
    randomize(clip, 1)
    state = clip.state_dict()
    if layout != "whole CLIP":
        state = {f"module.{k}": v for k, v in clip.visual.state_dict().items()}
    src = tmp_path / "openclip.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(src))
    head = head_file(tmp_path / "head.safetensors", 128)
    out = tmp_path / "spec.safetensors"
    result = invoke("import-checkpoint", src, "--format", "open_clip", "--head", tmp_path / "head.safetensors",
                    "--out", out, *flags)
    assert result.exit_code == 0, result.output
    meta = read_meta(out)
    assert meta["kind"] == "specialist" and meta["model"]["config"]["quick_gelu"] is quick_gelu
    detector = imported(out)
    x = pixels(64)
    with torch.no_grad():
        features = detector.features(x)
        # open_clip's own output is the pooled token times proj: ours is the pooled token itself
        assert torch.allclose(features @ clip.visual.proj, clip.visual(x), atol=ATOL)
        assert torch.allclose(detector(x), head(features), atol=ATOL)


def test_open_clip_wrong_activation_changes_features(tmp_path, project):
    """The activation is not in the weights: importing a GELU tower as QuickGELU is measurably wrong."""
    register_model_configs()
    torch.manual_seed(0)
    clip = open_clip.create_model("r2m-tiny").eval()
    randomize(clip, 1)
    src = tmp_path / "openclip.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(src))
    out = tmp_path / "theta0.safetensors"
    assert invoke("import-checkpoint", src, "--format", "open_clip", "--out", out,
                  "--act", "quick_gelu", "--heads", "4").exit_code == 0
    with torch.no_grad():
        wrong = imported(out).features(pixels(64)) @ clip.visual.proj
        assert (wrong - clip.visual(pixels(64))).abs().max() > 1e-3
    one_line_error(invoke("import-checkpoint", src, "--format", "open_clip", "--out", tmp_path / "x.safetensors",
                          "--heads", "4"), "openclip.safetensors", "--act")


# ------------------------------------------------------------------------- Hugging Face CLIP


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("layout", ["transformers 5 folder", "transformers 4 file", "with projection", "CLIPModel"])
def test_hf_clip_import_matches_pooler_output(tmp_path, project, act, layout):
    model = hf_vision(act)
    x = pixels(32)
    with torch.no_grad():
        reference = model(pixel_values=x).pooler_output
    config = tmp_path / "config.json"
    model.config.to_json_file(str(config))
    flags = []
    if layout == "transformers 5 folder":  # save_pretrained: config.json + flattened keys
        model.save_pretrained(tmp_path / "hf")
        src = tmp_path / "hf"
    elif layout == "transformers 4 file":
        src = tmp_path / "vision.safetensors"
        save_file({f"vision_model.{k}": v.contiguous() for k, v in model.state_dict().items()}, str(src))
        flags = ["--config", config]
    else:
        torch.manual_seed(0)
        if layout == "with projection":
            full = CLIPVisionModelWithProjection(CLIPVisionConfig(**HF_TINY, hidden_act=act, projection_dim=16))
            tower = full.vision_model
        else:
            text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                        vocab_size=49408, max_position_embeddings=8)
            full = CLIPModel(CLIPConfig(text_config=text, vision_config={**HF_TINY, "hidden_act": act}, projection_dim=16))
            tower = full.vision_model
        tower.load_state_dict(model.state_dict())
        src = tmp_path / "full.safetensors"
        save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(src))
        assert any(k.startswith("visual_projection.") for k in full.state_dict())  # dropped on import
        flags = ["--config", config]
    out = tmp_path / "theta0.safetensors"
    result = invoke("import-checkpoint", src, "--format", "hf-clip", "--out", out, *flags)
    assert result.exit_code == 0, result.output
    assert read_meta(out)["kind"] == "pretrained" and read_meta(out)["model"]["config"]["quick_gelu"] is (act == "quick_gelu")
    with torch.no_grad():
        assert torch.allclose(imported(out).features(x), reference, atol=ATOL)


def test_hf_bad_inputs_are_one_line(tmp_path, project):
    model = hf_vision("quick_gelu")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    no_q = tmp_path / "noq.safetensors"
    save_file({k: v for k, v in state.items() if k != "encoder.layers.1.self_attn.q_proj.weight"}, str(no_q))
    args = ["--format", "hf-clip", "--act", "quick_gelu", "--heads", "2", "--out", tmp_path / "o.safetensors"]
    one_line_error(invoke("import-checkpoint", no_q, *args), "noq.safetensors", "encoder.layers.1.self_attn.q_proj.weight")
    odd = tmp_path / "odd.safetensors"
    save_file({**state, "encoder.layers.0.adapter.weight": torch.zeros(2)}, str(odd))
    one_line_error(invoke("import-checkpoint", odd, *args), "odd.safetensors", "encoder.layers.0.adapter.weight")
    full = tmp_path / "full.safetensors"
    save_file(state, str(full))
    one_line_error(invoke("import-checkpoint", full, "--format", "hf-clip", "--out", tmp_path / "o.safetensors"), "--act")
    one_line_error(invoke("import-checkpoint", full, *args[:-2], "--out", full), "overwrite")
    one_line_error(invoke("import-checkpoint", full, "--format", "timm", "--out", tmp_path / "o.safetensors"), "timm")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"vision_config": {"hidden_act": "gelu_new", "num_attention_heads": 2}}))
    one_line_error(invoke("import-checkpoint", full, "--format", "hf-clip", "--config", cfg, "--out", tmp_path / "o.safetensors"),
                   "gelu_new")
    bad_head = tmp_path / "head.safetensors"
    head_file(bad_head, 64)
    one_line_error(invoke("import-checkpoint", full, *args, "--head", bad_head), "head.safetensors", "[2, 128]")
    assert not (tmp_path / "o.safetensors").exists()


# ------------------------------------------------------------------------- DeepfakeBench


class DeepfakeBenchCLIP(torch.nn.Module):
    """DeepfakeBench's `clip_detector.py`: the HF CLIP vision transformer's pooler_output into Linear(width, 2)."""

    def __init__(self, backbone: CLIPVisionModel):
        super().__init__()
        self.backbone = backbone
        self.head = torch.nn.Linear(backbone.config.hidden_size, 2)

    def forward(self, x):
        return self.head(self.backbone(pixel_values=x).pooler_output)


def deepfakebench_pth(path, theta0: CLIPVisionModel, seed: int):
    """A specialist fine-tuned from θ0 (θ0 + a small delta), saved as DeepfakeBench does under DataParallel."""
    backbone = CLIPVisionModel(theta0.config)
    backbone.load_state_dict(theta0.state_dict())
    detector = DeepfakeBenchCLIP(backbone).eval()
    randomize(detector, seed)
    torch.save(torch.nn.DataParallel(detector).state_dict(), path)
    return detector


@pytest.fixture
def hf_theta0(tmp_path, project):
    """θ0 as a Hugging Face folder, imported with `r2m import-checkpoint --format hf-clip`."""
    model = hf_vision("quick_gelu")
    model.save_pretrained(tmp_path / "clip-vit-tiny")
    out = tmp_path / "theta0.safetensors"
    result = invoke("import-checkpoint", tmp_path / "clip-vit-tiny", "--format", "hf-clip", "--out", out)
    assert result.exit_code == 0, result.output
    return model, out


def test_deepfakebench_import_matches_logits_in_torch_and_onnx(tmp_path, hf_theta0):
    model, theta0 = hf_theta0
    source = deepfakebench_pth(tmp_path / "ckpt_best.pth", model, seed=11)
    out = tmp_path / "spec.safetensors"
    result = invoke("import-checkpoint", tmp_path / "ckpt_best.pth", "--format", "deepfakebench",
                    "--pretrained", theta0, "--generator", "sd21", "--out", out)
    assert result.exit_code == 0, result.output
    meta = read_meta(out)
    assert meta["kind"] == "specialist" and meta["theta0_sha256"] == file_sha256(theta0)
    assert meta["model"] == read_meta(theta0)["model"] and meta["generator"] == "sd21"
    x = pixels(32)
    with torch.no_grad():
        want = source(x)
        detector = imported(out)
        assert torch.allclose(detector.features(x), source.backbone(pixel_values=x).pooler_output, atol=ATOL)
        assert torch.allclose(detector(x), want, atol=ATOL)

    params = load_params(root=tmp_path, export={"exporter": "torchscript", "int8": False})
    onnx_path = tmp_path / "spec.onnx"
    result = export_checkpoint(out, onnx_path, params)
    session = open_session(onnx_path, 1, providers=["CPUExecutionProvider"])
    logits, fake = session.run(None, {"pixel_values": x.numpy()})
    np.testing.assert_allclose(logits, want.numpy(), atol=1e-4)
    np.testing.assert_allclose(fake, torch.softmax(want, 1)[:, 1].numpy(), atol=1e-5)
    assert result.preprocessing["image_size"] == 32  # from the inline config, nothing else given


def test_deepfakebench_one_logit_head_and_unsafe_pickles(tmp_path, hf_theta0):
    model, theta0 = hf_theta0
    source = deepfakebench_pth(tmp_path / "a.pth", model, seed=5)
    state = {k: v for k, v in torch.load(tmp_path / "a.pth", weights_only=True).items() if not k.startswith("module.head")}
    head = head_file(tmp_path / "h.safetensors", 128, outputs=1)
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "b.pth")  # a wrapped state dict, headless
    out = tmp_path / "one.safetensors"
    # headless: DeepfakeBench layout minus its head; a one-logit head given separately
    one_line_error(invoke("import-checkpoint", tmp_path / "b.pth", "--format", "deepfakebench", "--pretrained", theta0,
                          "--out", out), "--head")
    result = invoke("import-checkpoint", tmp_path / "b.pth", "--format", "deepfakebench", "--pretrained", theta0,
                    "--head", tmp_path / "h.safetensors", "--out", out)
    assert result.exit_code == 0, result.output
    x = pixels(32)
    with torch.no_grad():
        features = source.backbone(pixel_values=x).pooler_output
        fake = torch.softmax(imported(out)(x), 1)[:, 1]
        assert torch.allclose(fake, torch.sigmoid(head(features))[:, 0], atol=1e-5)

    torch.save({"state_dict": state, "config": DeepfakeBenchCLIP}, tmp_path / "pickled.pth")  # a class: code, not weights
    one_line_error(invoke("import-checkpoint", tmp_path / "pickled.pth", "--format", "deepfakebench", "--out", out),
                   "pickled.pth", "weights_only=True")
    # a specialist said to have another tower than θ0's is refused
    one_line_error(invoke("import-checkpoint", tmp_path / "a.pth", "--format", "deepfakebench", "--pretrained", theta0,
                          "--act", "gelu", "--out", tmp_path / "g.safetensors"), "quick_gelu", "θ0")


def test_imported_specialists_merge_evaluate_and_export(tmp_path, hf_theta0):
    from fixtures import make_generator_dataset

    model, theta0 = hf_theta0
    specs = []
    for i, seed in enumerate((21, 22)):
        deepfakebench_pth(tmp_path / f"s{i}.pth", model, seed=seed)
        specs.append(tmp_path / f"s{i}.safetensors")
        assert invoke("import-checkpoint", tmp_path / f"s{i}.pth", "--format", "deepfakebench", "--pretrained", theta0,
                      "--generator", f"gen{i}", "--out", specs[i]).exit_code == 0
    merged = tmp_path / "merged.safetensors"
    result = invoke("merge", "--method", "r2m", "--alpha", "0.5", "--rank", "0.5", "--pretrained", theta0,
                    "--specialist", specs[0], "--specialist", specs[1], "--out", merged, "--quiet")
    assert result.exit_code == 0, result.output  # θ0 recorded by import: checked, no flag needed
    assert read_meta(merged)["theta0_check"] == "sha256"
    data = tmp_path / "data"
    make_generator_dataset(data, "gen0", n_per_class=12, groups=4, size=48)
    result = invoke("evaluate", "--model", merged, data / "gen0", "--specialist", specs[0])
    assert result.exit_code == 0, result.output
    assert "gen0" in result.output
    (tmp_path / "params.yaml").write_text("export:\n  exporter: torchscript\n  int8: false\n")
    result = invoke("export", "--model", merged, "--out", tmp_path / "m.onnx", "--params", tmp_path / "params.yaml")
    assert result.exit_code == 0, result.output
