"""Backbones on real EuroSAT patches, and the band matching of pretrained weights."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import torchvision
from PIL import Image
from torchgeo.models import ResNet18_Weights

from anneal_geo.backbones import weights as w
from anneal_geo.backbones.resnet import ResNet18Backbone
from anneal_geo.backbones.smallcnn import SmallCNNBackbone
from anneal_geo.backbones.spectral import SpectralBackbone
from anneal_geo.data.bands import EUROSAT_MS_BANDS
from anneal_geo.errors import ConfigError, DataError

SAMPLES = Path(__file__).resolve().parents[1] / "sample_tiles"
#: EuroSAT-MS's band order inside the files: B8A is last.
MS_BANDS = list(EUROSAT_MS_BANDS)
#: SSL4EO-S12 / TorchGeo order: B8A after B08.
SSL4EO_BANDS = [*MS_BANDS[:8], "B8A", *MS_BANDS[8:12]]
RGB = ["B04", "B03", "B02"]
BACKBONES = [SpectralBackbone, ResNet18Backbone, SmallCNNBackbone]


def load_ms(per_class: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Real EuroSAT-MS patches (N, 13, 64, 64) float32 in file order, and class indices."""
    folders = sorted(p for p in (SAMPLES / "eurosat_ms").iterdir() if p.is_dir())
    patches, labels = [], []
    for label, folder in enumerate(folders):
        for path in sorted(folder.glob("*.tif"))[:per_class]:
            with rasterio.open(path) as src:
                patches.append(src.read())
            labels.append(label)
    return np.stack(patches).astype(np.float32), np.array(labels)


def load_rgb(per_class: int) -> np.ndarray:
    """Real EuroSAT-RGB JPEGs (N, 3, 64, 64) float32 0..255, bands B04, B03, B02."""
    folders = sorted(p for p in (SAMPLES / "eurosat_rgb").iterdir() if p.is_dir())
    images = [
        np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1)
        for folder in folders
        for path in sorted(folder.glob("*.jpg"))[:per_class]
    ]
    return np.stack(images).astype(np.float32)


def stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    return x.mean(axis=(0, 2, 3)).tolist(), x.std(axis=(0, 2, 3)).tolist()


@pytest.fixture(scope="module")
def ms() -> np.ndarray:
    return load_ms(per_class=3)[0]


def run(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    module.eval()
    with torch.inference_mode():
        return module(torch.from_numpy(x)).numpy()


def test_importing_the_backbones_and_trainer_does_not_import_torch() -> None:
    code = (
        "import sys, anneal_geo.backbones, anneal_geo.backbones.spectral, "
        "anneal_geo.backbones.resnet, anneal_geo.backbones.smallcnn, "
        "anneal_geo.backbones.weights, anneal_geo.training\n"
        "heavy = [m for m in ('torch', 'torchgeo', 'torchvision') if m in sys.modules]\n"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- every backbone


@pytest.mark.parametrize("backbone", BACKBONES, ids=lambda b: b.__name__)
@pytest.mark.parametrize("bands", [MS_BANDS, RGB], ids=["ms13", "rgb-subset"])
def test_backbone_builds_and_maps_real_patches(
    backbone: type, bands: list[str], ms: np.ndarray
) -> None:
    x = ms[:6][:, [MS_BANDS.index(b) for b in bands]]
    mean, std = stats(ms[:, [MS_BANDS.index(b) for b in bands]])
    module = backbone(seed=3).checked_build(bands, mean, std)
    out = run(module, x)
    assert out.shape == (6, module.out_dim)
    assert np.isfinite(out).all()
    assert out.std(axis=0).max() > 0  # different patches, different features
    again = run(backbone(seed=3).checked_build(bands, mean, std), x)
    np.testing.assert_array_equal(out, again)


@pytest.mark.parametrize("backbone", [ResNet18Backbone, SmallCNNBackbone], ids=lambda b: b.__name__)
def test_trainable_backbones_depend_on_the_seed(backbone: type, ms: np.ndarray) -> None:
    mean, std = stats(ms)
    assert backbone.trainable
    a = run(backbone(seed=0).build(MS_BANDS, mean, std), ms[:4])
    b = run(backbone(seed=1).build(MS_BANDS, mean, std), ms[:4])
    assert not np.allclose(a, b)


def test_output_dimensions() -> None:
    mean, std = [0.0] * 3, [1.0] * 3
    assert ResNet18Backbone().build(RGB, mean, std).out_dim == 512
    assert SmallCNNBackbone().build(RGB, mean, std).out_dim == 256
    assert SmallCNNBackbone(widths=(8, 16)).build(RGB, mean, std).out_dim == 16


def test_backbone_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="spectral"):
        SpectralBackbone(weights="x.pth")
    with pytest.raises(ConfigError, match="colour"):
        SpectralBackbone(colour=True)
    with pytest.raises(ConfigError, match="depth"):
        SmallCNNBackbone(depth=3)
    with pytest.raises(ConfigError, match="pretrained"):
        SmallCNNBackbone(weights="x.pth")
    with pytest.raises(ConfigError, match="normalize"):
        ResNet18Backbone(normalize="minmax")
    with pytest.raises(ConfigError, match="weights_bands"):
        ResNet18Backbone(weights_bands=RGB)


# ----------------------------------------------------------------------------- spectral


def test_spectral_ndvi_equals_a_hand_computation_on_a_real_patch() -> None:
    path = SAMPLES / "eurosat_ms" / "Forest" / "Forest_1.tif"
    with rasterio.open(path) as src:
        patch = src.read().astype(np.float64)
    mean, std = stats(patch[None].astype(np.float32))
    trunk = SpectralBackbone().build(MS_BANDS, mean, std)
    features = dict(
        zip(trunk.feature_names, run(trunk, patch[None].astype(np.float32))[0], strict=True)
    )
    nir, red = patch[MS_BANDS.index("B08")], patch[MS_BANDS.index("B04")]
    ndvi = (nir - red) / (nir + red)
    scale = trunk_scales()
    assert features["NDVI:mean"] == pytest.approx(ndvi.mean() * scale["index_mean"], rel=1e-4)
    assert features["NDVI:std"] == pytest.approx(ndvi.std() * scale["index_std"], rel=1e-3)
    assert ndvi.mean() > 0.5  # a forest: the hand computation is itself plausible


def trunk_scales() -> dict[str, float]:
    from anneal_geo._nets import SCALES

    return SCALES


def test_spectral_features_follow_band_names_not_channel_positions(ms: np.ndarray) -> None:
    mean, std = stats(ms)
    base = SpectralBackbone().build(MS_BANDS, mean, std)
    order = np.random.default_rng(0).permutation(len(MS_BANDS))
    shuffled = SpectralBackbone().build(
        [MS_BANDS[i] for i in order], [mean[i] for i in order], [std[i] for i in order]
    )
    a = dict(zip(base.feature_names, run(base, ms[:5]).T, strict=True))
    b = dict(zip(shuffled.feature_names, run(shuffled, ms[:5][:, order]).T, strict=True))
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-5, err_msg=name)


def test_spectral_indices_follow_the_available_bands(ms: np.ndarray) -> None:
    full = SpectralBackbone().build(MS_BANDS, *stats(ms))
    assert {"NDVI:mean", "NDWI:mean", "NDBI:mean", "NBR:mean", "NDRE:mean"} <= set(
        full.feature_names
    )
    rgb = SpectralBackbone().build(RGB, *stats(ms[:, [3, 2, 1]]))
    assert [n for n in rgb.feature_names if n.startswith(("GRVI", "ND"))] == [
        "GRVI:mean",
        "GRVI:std",
    ]
    lowercase = SpectralBackbone().build(["b1", "b9"], *stats(ms[:, [0, 8]]))
    assert lowercase.feature_names[:2] == ["B01:mean", "B09:mean"]
    assert not any(n.startswith(("GRVI", "ND")) for n in lowercase.feature_names)
    out = run(lowercase, ms[:3][:, [0, 8]])
    assert out.shape == (3, lowercase.out_dim) == (3, 12)
    assert np.isfinite(out).all()


def test_spectral_features_do_not_depend_on_the_batch(ms: np.ndarray) -> None:
    trunk = SpectralBackbone().build(MS_BANDS, *stats(ms))
    together = run(trunk, ms[:8])
    alone = np.concatenate([run(trunk, ms[i : i + 1]) for i in range(8)])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-5)
    # roughly unit scale, as the head expects
    assert 0.1 < np.abs(together).mean() < 5


def test_spectral_on_8bit_rgb_jpegs() -> None:
    x = load_rgb(per_class=2)
    trunk = SpectralBackbone().checked_build(RGB, *stats(x))
    out = run(trunk, x)
    assert out.shape == (20, trunk.out_dim)
    assert np.isfinite(out).all()
    grvi = out[:, trunk.feature_names.index("GRVI:mean")] / trunk_scales()["index_mean"]
    g, r = x[:, 1].astype(np.float64), x[:, 0].astype(np.float64)
    expect = ((g - r) / np.maximum(g + r, 1e-6)).mean(axis=(1, 2))
    np.testing.assert_allclose(grvi, expect, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- band matching


def test_canonical_band_names() -> None:
    assert [w.canonical_band(b) for b in ["B1", "b01", " B8a", "B8A", "B12", "VV"]] == [
        "B01",
        "B01",
        "B8A",
        "B8A",
        "B12",
        "VV",
    ]


def test_match_bands_reorders_eurosat_to_ssl4eo_order() -> None:
    mapping = w.match_bands(MS_BANDS, SSL4EO_BANDS)
    assert mapping.indices == (0, 1, 2, 3, 4, 5, 6, 7, 12, 8, 9, 10, 11)
    assert mapping.reordered and not mapping.identity and mapping.dropped == ()
    assert "reordered" in mapping.describe()
    assert [MS_BANDS[i] for i in mapping.indices] == SSL4EO_BANDS
    same = w.match_bands(
        SSL4EO_BANDS,
        ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8a", "B9", "B10", "B11", "B12"],
    )
    assert same.identity and not same.reordered


def test_match_bands_selects_a_subset_and_reports_dropped_bands() -> None:
    mapping = w.match_bands(MS_BANDS, ["B4", "B3", "B2"])
    assert mapping.indices == (3, 2, 1)
    assert mapping.reordered
    assert set(mapping.dropped) == set(MS_BANDS) - set(RGB)
    in_order = w.match_bands(MS_BANDS, ["B02", "B03"])
    assert not in_order.reordered and not in_order.identity and in_order.indices == (1, 2)


def test_match_bands_names_missing_bands() -> None:
    with pytest.raises(DataError, match=r"lacks B01, B05, B06") as info:
        w.match_bands(RGB, SSL4EO_BANDS, weights_label="weights X")
    assert "weights X" in str(info.value) and "smallcnn" in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="twice"):
        w.match_bands(["B02", "B2"], ["B02"])


def test_torchgeo_enum_bands_and_normalization() -> None:
    member = w.resolve_enum("ResNet18_Weights.SENTINEL2_ALL_MOCO")
    assert member is ResNet18_Weights.SENTINEL2_ALL_MOCO
    assert w.enum_bands(member) == SSL4EO_BANDS
    assert w.resolve_enum("sentinel2_rgb_moco") is ResNet18_Weights.SENTINEL2_RGB_MOCO
    assert w.enum_bands(ResNet18_Weights.SENTINEL2_RGB_MOCO) == RGB
    mean, std = w.enum_normalization(member)  # type: ignore[misc]
    assert mean == [0.0] * 13 and std == [10000.0] * 13
    with pytest.raises(DataError, match="SENTINEL2_ALL_MOCO"):
        w.resolve_enum("ResNet18_Weights.SENTINEL3_FOO")


def test_chained_normalize_steps_fold_into_one() -> None:
    # SeCo chains three Normalize steps; the folded (mean, std) must act the same.
    seco = ResNet18_Weights.SENTINEL2_RGB_SECO
    folded = w.enum_normalization(seco)
    assert folded is not None
    x = torch.rand(2, 3, 8, 8) * 150
    expect = x.clone()
    for module in seco.transforms.modules():
        if type(module).__name__ == "Normalize":
            expect = module(expect)
    mean, std = (torch.tensor(v)[:, None, None] for v in folded)
    torch.testing.assert_close((x - mean) / std, expect, rtol=1e-4, atol=1e-4)


def test_weights_file_or_enum_name(tmp_path: Path) -> None:
    assert not w.is_weights_file("ResNet18_Weights.SENTINEL2_ALL_MOCO")
    assert w.is_weights_file("weights/resnet.pth") and w.is_weights_file("model.ckpt")
    (tmp_path / "plain").write_bytes(b"")
    assert w.is_weights_file(str(tmp_path / "plain"))


# ----------------------------------------------------------------------------- resnet weights


def ssl4eo_order_resnet(seed: int = 7) -> torch.nn.Module:
    """A ResNet-18 standing in for a pretrained checkpoint: 13 inputs in SSL4EO order."""
    torch.manual_seed(seed)
    net = torchvision.models.resnet18(weights=None)
    net.conv1 = torch.nn.Conv2d(13, 64, 7, 2, 3, bias=False)
    net.fc = torch.nn.Identity()
    return net.eval()


def test_resnet_checkpoint_with_bands_reorders_eurosat_channels(
    tmp_path: Path, ms: np.ndarray
) -> None:
    net = ssl4eo_order_resnet()
    path = tmp_path / "ssl4eo_like.pth"
    # TorchGeo-task style: wrapped and prefixed, a projection head beside the backbone,
    # and the band list (TorchGeo spelling) alongside.
    state = {f"model.backbone.{k}": v for k, v in net.state_dict().items()}
    state["model.projector.0.weight"] = torch.zeros(128, 512)
    ssl4eo_spelling = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8a", "B9", "B10"]
    torch.save({"state_dict": state, "bands": [*ssl4eo_spelling, "B11", "B12"]}, path)
    mean, std = stats(ms)
    backbone = ResNet18Backbone(weights=str(path), normalize="pool")
    trunk = backbone.checked_build(MS_BANDS, mean, std)
    assert trunk.band_mapping.reordered and backbone.last_band_mapping is trunk.band_mapping
    assert trunk.bands == SSL4EO_BANDS
    order = [MS_BANDS.index(b) for b in SSL4EO_BANDS]
    # The same weights, given a pool already in the weights' order.
    in_order = ResNet18Backbone(weights=str(path), normalize="pool").build(
        SSL4EO_BANDS, [mean[i] for i in order], [std[i] for i in order]
    )
    assert in_order.band_mapping.identity
    x = ms[:4]
    out = run(trunk, x)
    np.testing.assert_allclose(out, run(in_order, x[:, order]), rtol=1e-5, atol=1e-5)
    # And both equal the original network on standardised, reordered input.
    z = (x[:, order] - np.array(mean)[order, None, None]) / np.array(std)[order, None, None]
    with torch.inference_mode():
        direct = net(torch.from_numpy(z.astype(np.float32))).numpy()
    np.testing.assert_allclose(out, direct, rtol=1e-4, atol=1e-4)
    # Feeding the channels unreordered would give something else: the check can fail.
    assert not np.allclose(run(in_order, x), out, atol=1e-3)


def test_resnet_checkpoint_bands_from_sidecar_or_option(tmp_path: Path, ms: np.ndarray) -> None:
    net = ssl4eo_order_resnet()
    path = tmp_path / "plain.pth"
    torch.save(net.state_dict(), path)
    mean, std = stats(ms)
    with pytest.raises(DataError, match=r"does not record which bands.*weights_bands"):
        ResNet18Backbone(weights=str(path)).build(MS_BANDS, mean, std)
    via_option = ResNet18Backbone(weights=str(path), weights_bands=SSL4EO_BANDS)
    out_option = run(via_option.build(MS_BANDS, mean, std), ms[:2])
    (tmp_path / "plain.json").write_text(json.dumps({"bands": SSL4EO_BANDS}))
    via_sidecar = ResNet18Backbone(weights=str(path)).build(MS_BANDS, mean, std)
    assert via_sidecar.band_mapping.reordered
    np.testing.assert_allclose(run(via_sidecar, ms[:2]), out_option, rtol=1e-5, atol=1e-5)
    pool_order = ResNet18Backbone(weights=str(path), weights_bands="pool").build(
        MS_BANDS, mean, std
    )
    assert pool_order.band_mapping.identity


def test_resnet_checkpoint_missing_bands_and_bad_files(tmp_path: Path, ms: np.ndarray) -> None:
    path = tmp_path / "ssl4eo.pth"
    torch.save({**ssl4eo_order_resnet().state_dict(), "bands": SSL4EO_BANDS}, path)
    rgb_mean, rgb_std = stats(ms[:, [3, 2, 1]])
    with pytest.raises(DataError, match=r"lacks B01, B05, B06, B07, B08, B8A, B09, B10, B11, B12"):
        ResNet18Backbone(weights=str(path)).checked_build(RGB, rgb_mean, rgb_std)
    with pytest.raises(DataError, match="first convolution takes 13 bands"):
        ResNet18Backbone(weights=str(path), weights_bands=RGB).build(RGB, rgb_mean, rgb_std)
    with pytest.raises(DataError, match="not found"):
        ResNet18Backbone(weights=str(tmp_path / "absent.pth")).build(RGB, rgb_mean, rgb_std)
    junk = tmp_path / "junk.pth"
    torch.save({"weight": torch.zeros(3)}, junk)
    with pytest.raises(DataError, match="conv1.weight"):
        ResNet18Backbone(weights=str(junk), weights_bands="pool").build(RGB, rgb_mean, rgb_std)


def test_resnet_enum_weights_from_the_hub_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ms: np.ndarray
) -> None:
    # Put a file where torch hub would have downloaded SENTINEL2_RGB_MOCO: no network needed.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    member = ResNet18_Weights.SENTINEL2_RGB_MOCO
    cache = tmp_path / "hub" / "checkpoints" / Path(member.url).name
    cache.parent.mkdir(parents=True)
    torch.manual_seed(1)
    net = torchvision.models.resnet18(weights=None)
    net.fc = torch.nn.Identity()
    torch.save(net.state_dict(), cache)
    trunk = ResNet18Backbone(weights="ResNet18_Weights.SENTINEL2_RGB_MOCO").build(
        MS_BANDS, *stats(ms)
    )
    assert trunk.bands == RGB and trunk.band_mapping.indices == (3, 2, 1)
    # The weights' own normalisation (reflectance / 10000), not the pool's.
    assert trunk.standardize.std.flatten().tolist() == [10000.0] * 3
    x = ms[:2]
    with torch.inference_mode():
        direct = net.eval()(torch.from_numpy(x[:, [3, 2, 1]] / 10000.0).float()).numpy()
    np.testing.assert_allclose(run(trunk, x), direct, rtol=1e-4, atol=1e-4)


def test_resnet_enum_weights_offline_say_to_pass_a_local_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ms: np.ndarray
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    name = "ResNet18_Weights.SENTINEL2_RGB_MOCO"
    rgb = ms[:, [3, 2, 1]]
    with pytest.raises(DataError, match=r"not in the torch hub cache.*local file") as info:
        ResNet18Backbone(weights=name, allow_download=False).build(RGB, *stats(rgb))
    assert "hf.co" in str(info.value)
    # The pool's bands are checked before any download is tried.
    with pytest.raises(DataError, match="lacks B01"):
        ResNet18Backbone(weights="ResNet18_Weights.SENTINEL2_ALL_MOCO").build(RGB, *stats(rgb))
    if w._probe_host(ResNet18_Weights.SENTINEL2_RGB_MOCO.url, 3.0) is None:
        pytest.skip("the weights host is reachable: the offline path cannot be exercised here")
    start = time.perf_counter()
    with pytest.raises(DataError, match=r"cannot download.*local file"):
        ResNet18Backbone(weights=name).build(RGB, *stats(rgb))
    assert time.perf_counter() - start < 15
