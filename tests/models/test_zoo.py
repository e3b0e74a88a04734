"""models.zoo: every loader on tiny random-init models in tmp dirs (nothing is downloaded)."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest

open_clip = pytest.importorskip("open_clip")
torch = pytest.importorskip("torch")

from open_clip import factory as open_clip_factory  # noqa: E402

from models import zoo  # noqa: E402
from models.demo.config import ARTIFACTS_DIR, WEIGHTS_FILE  # noqa: E402
from models.preprocess import PreprocessConfig  # noqa: E402
from models.scoring import cosines  # noqa: E402
from models.tokenizer import TokenizerSpec  # noqa: E402
from tests.tiny_models import tiny_hf_clip_config  # noqa: E402

TINY = "zoo-test-tiny-vit"
TINY_SIGMOID = "zoo-test-tiny-vit-sigmoid"
TINY_HF_TEXT = "zoo-test-tiny-hf-tokenizer"
TINY_CONFIG = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 64, "head_width": 32, "layers": 2},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
SIGMOID_CONFIG = {**TINY_CONFIG, "init_logit_scale": math.log(10), "init_logit_bias": -10}
HF_TEXT_CONFIG = {**TINY_CONFIG, "text_cfg": {**TINY_CONFIG["text_cfg"], "hf_tokenizer_name": "timm/ViT-B-16-SigLIP"}}


@pytest.fixture(autouse=True)
def tiny_architectures(monkeypatch: pytest.MonkeyPatch) -> None:
    # Registered per test and removed afterwards, so open_clip's registry is left as found.
    configs = {TINY: TINY_CONFIG, TINY_SIGMOID: SIGMOID_CONFIG, TINY_HF_TEXT: HF_TEXT_CONFIG}
    for name, config in configs.items():
        monkeypatch.setitem(open_clip_factory._MODEL_CONFIGS, name, copy.deepcopy(config))


def _pixels(size: int, batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def _token_ids(spec: TokenizerSpec, lengths: tuple[int, ...] = (0, 3, 10)) -> torch.Tensor:
    """Well-formed rows: start, a few word ids, end, padding."""
    ids = torch.full((len(lengths), spec.context_length), spec.pad_token_id, dtype=torch.long)
    for row, length in enumerate(lengths):
        words = list(range(320, 320 + length))
        ids[row, : length + 2] = torch.tensor([spec.sot_token_id, *words, spec.eot_token_id])
    return ids


def _embed(loaded: zoo.LoadedModel) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        images = loaded.image_tower(_pixels(loaded.preprocess.image_size))
        texts = loaded.text_tower(_token_ids(loaded.tokenizer))
    return images, texts


def _check_embeddings(loaded: zoo.LoadedModel) -> tuple[torch.Tensor, torch.Tensor]:
    images, texts = _embed(loaded)
    assert images.shape == (3, loaded.embed_dim) and texts.shape == (3, loaded.embed_dim)
    for embeddings in (images, texts):
        assert embeddings.dtype == torch.float32
        torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(3))
    return images, texts


def test_open_clip_tiny_random_init() -> None:
    loaded = zoo.load_open_clip(TINY)
    images, texts = _check_embeddings(loaded)
    assert loaded.name == TINY and loaded.embed_dim == 24
    assert loaded.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)
    assert loaded.logit_bias is None and loaded.activation == "softmax"
    assert loaded.preprocess == PreprocessConfig(image_size=32)
    assert loaded.tokenizer == TokenizerSpec(context_length=77)
    assert loaded.source["kind"] == "open_clip" and loaded.source["pretrained"] is None
    assert loaded.source["architecture"] == TINY and loaded.source["model_class"] == "CLIP"
    assert not loaded.image_tower.training and not loaded.text_tower.training
    probabilities = loaded.scoring.probabilities(cosines(images.numpy(), texts.numpy()))
    torch.testing.assert_close(torch.from_numpy(probabilities).sum(dim=-1), torch.ones(3, dtype=torch.float64))


def test_towers_build_no_graph_outside_inference_mode() -> None:
    loaded = zoo.load_open_clip(TINY)
    assert not loaded.text_tower(_token_ids(loaded.tokenizer)).requires_grad


def test_towers_equal_open_clip_encoders() -> None:
    loaded = zoo.load_open_clip(TINY)
    model = loaded.image_tower.model
    pixels, ids = _pixels(32), _token_ids(loaded.tokenizer)
    images, texts = _embed(loaded)
    with torch.inference_mode():
        torch.testing.assert_close(images, model.encode_image(pixels, normalize=True), rtol=0, atol=0)
        torch.testing.assert_close(texts, model.encode_text(ids, normalize=True), rtol=0, atol=0)


def test_sigmoid_model_with_logit_bias() -> None:
    loaded = zoo.load_open_clip(TINY_SIGMOID)
    images, texts = _check_embeddings(loaded)
    assert loaded.activation == "sigmoid"
    assert loaded.logit_bias == -10.0
    assert loaded.logit_scale == pytest.approx(10.0, rel=1e-5)
    expected = torch.sigmoid(10.0 * images @ texts.T - 10.0)
    probabilities = loaded.scoring.probabilities(cosines(images.numpy(), texts.numpy()))
    torch.testing.assert_close(torch.from_numpy(probabilities).float(), expected)


def test_open_clip_vit_b_32_random_init() -> None:
    loaded = zoo.load_open_clip("ViT-B-32")
    _check_embeddings(loaded)
    assert loaded.embed_dim == 512 and loaded.preprocess == PreprocessConfig(image_size=224)
    assert loaded.tokenizer == TokenizerSpec() and loaded.activation == "softmax"


@pytest.mark.parametrize("architecture", [TINY_HF_TEXT, "ViT-B-16-SigLIP"])
def test_non_clip_tokenizer_is_rejected_before_building(architecture: str) -> None:
    with pytest.raises(zoo.UnsupportedModelError, match="CLIP's BPE tokenizer"):
        zoo.load_open_clip(architecture)


def test_unknown_architecture() -> None:
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        zoo.load_open_clip("no-such-architecture")


def _tiny_model_with_scale(scale: float) -> torch.nn.Module:
    torch.manual_seed(1)
    model = open_clip.create_model(TINY).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(scale))  # a value random init cannot give, so it proves the load
    return model


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_local_checkpoint_round_trip(tmp_path: Path, suffix: str) -> None:
    model = _tiny_model_with_scale(42.0)
    path = tmp_path / f"tiny{suffix}"
    if suffix == ".pt":
        torch.save(model.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))

    loaded = zoo.load_open_clip_checkpoint(path, TINY)
    images, texts = _check_embeddings(loaded)
    with torch.inference_mode():
        torch.testing.assert_close(images, model.encode_image(_pixels(32), normalize=True))
        torch.testing.assert_close(texts, model.encode_text(_token_ids(loaded.tokenizer), normalize=True))
    assert loaded.logit_scale == pytest.approx(42.0, rel=1e-5)
    assert loaded.source["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.source["kind"] == "open_clip_checkpoint" and loaded.source["path"] == str(path.resolve())


def test_load_model_references(tmp_path: Path) -> None:
    path = tmp_path / "tiny.pt"
    torch.save(_tiny_model_with_scale(42.0).state_dict(), path)
    from_file = zoo.load_model(f"open_clip:{TINY}@{path}")
    assert from_file.source["kind"] == "open_clip_checkpoint" and from_file.logit_scale == pytest.approx(42.0)
    assert zoo.load_model(f"open_clip:{TINY}").source["pretrained"] is None
    for bad in ("open_clip:", "onnx:model.onnx", "hf:"):
        with pytest.raises(ValueError, match="cannot parse model reference"):
            zoo.load_model(bad)


@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random transformers CLIPModel with its image processor, saved once for the module."""
    transformers = pytest.importorskip("transformers")
    config = tiny_hf_clip_config()
    torch.manual_seed(2)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(20.0))
    directory = tmp_path_factory.mktemp("hf_clip")
    model.save_pretrained(directory)
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(directory)
    return directory


def _hf_features(output: object) -> torch.Tensor:
    # transformers 5 returns an output object, 4.x the tensor.
    features = output if isinstance(output, torch.Tensor) else output.pooler_output
    return torch.nn.functional.normalize(features, dim=-1)


def test_hugging_face_clip(hf_clip_dir: Path) -> None:
    from transformers import CLIPModel

    loaded = zoo.load_hf_clip(hf_clip_dir)
    images, texts = _check_embeddings(loaded)
    reference = CLIPModel.from_pretrained(hf_clip_dir, local_files_only=True).eval()
    with torch.inference_mode():
        torch.testing.assert_close(images, _hf_features(reference.get_image_features(_pixels(32))))
        torch.testing.assert_close(texts, _hf_features(reference.get_text_features(_token_ids(loaded.tokenizer))))
    assert loaded.embed_dim == 24 and loaded.logit_scale == pytest.approx(20.0, rel=1e-5)
    assert loaded.logit_bias is None and loaded.activation == "softmax"
    assert loaded.preprocess == PreprocessConfig(image_size=32)
    assert loaded.tokenizer == TokenizerSpec(context_length=77)
    assert loaded.source["preprocess_from"] == "preprocessor_config.json"
    weights = hf_clip_dir / "model.safetensors"
    assert loaded.source["weights"] == {weights.name: hashlib.sha256(weights.read_bytes()).hexdigest()}


def _copy_hf_dir(hf_clip_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(hf_clip_dir, tmp_path / "copy"))


def _edit_json(path: Path, **changes: object) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_hugging_face_preprocessor_config_is_read(hf_clip_dir: Path, tmp_path: Path) -> None:
    directory = _copy_hf_dir(hf_clip_dir, tmp_path)
    mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    _edit_json(directory / "preprocessor_config.json", image_mean=mean, image_std=std, resample=2)
    preprocess = zoo.load_hf_clip(directory).preprocess
    assert preprocess == PreprocessConfig(image_size=32, mean=tuple(mean), std=tuple(std), interpolation="bilinear")


def test_hugging_face_without_preprocessor_config(hf_clip_dir: Path, tmp_path: Path) -> None:
    directory = _copy_hf_dir(hf_clip_dir, tmp_path)
    (directory / "preprocessor_config.json").unlink()
    loaded = zoo.load_hf_clip(directory)
    assert loaded.preprocess == PreprocessConfig(image_size=32)
    assert loaded.source["preprocess_from"] == "defaults"


def test_hugging_face_legacy_token_ids(hf_clip_dir: Path, tmp_path: Path) -> None:
    # openai/clip-vit-* configs still say bos 0, eos 2, pad 1; the real tokenizer uses CLIP's ids.
    directory = _copy_hf_dir(hf_clip_dir, tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["text_config"].update(bos_token_id=0, eos_token_id=2, pad_token_id=1)
    (directory / "config.json").write_text(json.dumps(config))
    loaded = zoo.load_hf_clip(directory)
    assert loaded.tokenizer == TokenizerSpec(context_length=77)
    _check_embeddings(loaded)


def test_hugging_face_resize_then_crop_is_rejected(hf_clip_dir: Path, tmp_path: Path) -> None:
    directory = _copy_hf_dir(hf_clip_dir, tmp_path)
    _edit_json(directory / "preprocessor_config.json", size={"shortest_edge": 36})
    with pytest.raises(zoo.UnsupportedModelError, match="resize to 36 then crop to 32"):
        zoo.load_hf_clip(directory)


def test_hugging_face_other_model_type_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "siglip"}))
    with pytest.raises(zoo.UnsupportedModelError, match="only 'clip'"):
        zoo.load_hf_clip(tmp_path)


def _demo_card_and_model() -> tuple[dict, torch.nn.Module]:
    from models.demo import checkpoint
    from models.demo.config import CONTEXT_LENGTH, MODEL_CONFIG, PREPROCESS

    torch.manual_seed(3)
    card = {"name": "demo-under-test", "model_config": MODEL_CONFIG, "preprocess": PREPROCESS}
    return {**card, "context_length": CONTEXT_LENGTH}, checkpoint.build_model(MODEL_CONFIG).eval()


def test_demo_loader_on_a_fresh_checkpoint(tmp_path: Path) -> None:
    from models.demo import checkpoint

    card, model = _demo_card_and_model()
    checkpoint.save(model, card, tmp_path)
    loaded = zoo.load_demo(tmp_path)
    images, texts = _check_embeddings(loaded)
    reference = checkpoint.load(tmp_path)  # the fp16 round trip is what serving sees, so compare to it
    with torch.inference_mode():
        torch.testing.assert_close(images, reference.encode_image(_pixels(64), normalize=True))
        torch.testing.assert_close(texts, reference.encode_text(_token_ids(loaded.tokenizer), normalize=True))
    assert loaded.name == "demo-under-test" and loaded.embed_dim == 64
    assert loaded.preprocess == PreprocessConfig.from_dict(card["preprocess"])
    assert loaded.tokenizer == TokenizerSpec(context_length=card["context_length"])
    weights = tmp_path / WEIGHTS_FILE
    assert loaded.source["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert zoo.load_model(f"demo:{tmp_path}").source["kind"] == "demo"


@pytest.mark.skipif(
    not (ARTIFACTS_DIR / WEIGHTS_FILE).is_file(),
    reason=f"demo artifacts not trained yet ({ARTIFACTS_DIR / WEIGHTS_FILE} missing); run clipserve train-demo",
)
def test_built_in_demo_model() -> None:
    from models.demo import checkpoint

    card = checkpoint.read_card()
    loaded = zoo.load_demo()
    _check_embeddings(loaded)
    assert loaded.name == card["name"] and loaded.source["kind"] == "demo"
    assert loaded.preprocess == PreprocessConfig.from_dict(card["preprocess"])
    assert loaded.tokenizer.context_length == card["context_length"]


def test_missing_paths_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"checkpoint .*nope\.pt does not exist"):
        zoo.load_open_clip_checkpoint(tmp_path / "nope.pt", TINY)
    with pytest.raises(FileNotFoundError, match=r"directory .*nope does not exist"):
        zoo.load_hf_clip(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        zoo.load_hf_clip(tmp_path)
    with pytest.raises(FileNotFoundError, match="train it first"):
        zoo.load_demo(tmp_path)
