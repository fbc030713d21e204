"""Plugins: options from the command line and config files, options checked by name,
`plugins show`, provenance in session.toml, backbone errors that name the plugin,
`plugins check --conformance`, and the conformance kit's new checks.

Real plugin distributions are written to a temporary folder and pip-installed there
(``--target``), never into the environment; the CLI sees them through PYTHONPATH.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from anneal_geo import plugins
from anneal_geo._options import parse_assignments, parse_value
from anneal_geo.backbones.base import Backbone
from anneal_geo.engine import check_settings
from anneal_geo.errors import ConfigError, PluginError
from anneal_geo.estimators.base import Estimator
from anneal_geo.estimators.mgue import MGUEEstimator
from anneal_geo.session import SessionConfig
from anneal_geo.testing import ConformanceError, check_backbone, check_estimator

ROOT = Path(__file__).resolve().parent.parent
EXE = Path(sys.executable).parent / "anneal-geo"
QUICK = ["--rounds", "0", "--initial", "6", "--epochs", "1"]

PROBE = '''
"""Probe plugins for anneal-geo's tests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from anneal_geo.backbones.base import Backbone
from anneal_geo.estimators.base import Estimator


class ProbeEstimator(Estimator):
    """Uncertainty = closeness of a pair's distance to the median distance."""

    def __init__(self, seed: int = 0, scale: float = 1.0, **options: Any) -> None:
        super().__init__(seed, scale=scale, **options)
        self.scale = float(scale)

    def score(self, embeddings: np.ndarray, pairs: np.ndarray) -> np.ndarray:
        """Return (M,) float64."""
        d = np.linalg.norm(embeddings[pairs[:, 0]] - embeddings[pairs[:, 1]], axis=1)
        middle = float(np.median(d)) if d.size else 0.0
        return -self.scale * np.abs(d - middle).astype(np.float64)


class Stem13Backbone(Backbone):
    """A 13-band convolution stem, whatever the bands it is given (a bug)."""

    trainable = True

    def build(self, bands: Sequence[str], mean: Sequence[float], std: Sequence[float]) -> Any:
        """Return the stem."""
        import torch
        from torch import nn

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            net = nn.Sequential(
                nn.Conv2d(13, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()
            )
        net.out_dim = 8
        return net
'''

HEAVY = '''
"""An estimator module that imports torch at its top."""

from __future__ import annotations

import numpy as np
import torch  # noqa: F401 - the point of this module

from anneal_geo.estimators.base import Estimator


class HeavyEstimator(Estimator):
    """Pair distances."""

    def score(self, embeddings: np.ndarray, pairs: np.ndarray) -> np.ndarray:
        """Return (M,) float64."""
        d = np.linalg.norm(embeddings[pairs[:, 0]] - embeddings[pairs[:, 1]], axis=1)
        return d.astype(np.float64)
'''


def probe_distribution(root: Path, version: str) -> Path:
    source = root / f"probe-{version}"
    (source / "anneal_geo_trust_probe").mkdir(parents=True)
    (source / "anneal_geo_trust_probe" / "__init__.py").write_text(PROBE, encoding="utf-8")
    (source / "anneal_geo_trust_probe" / "heavy.py").write_text(HEAVY, encoding="utf-8")
    (source / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""
            [build-system]
            requires = ["hatchling>=1.25"]
            build-backend = "hatchling.build"

            [project]
            name = "anneal-geo-trust-probe"
            version = "{version}"
            requires-python = ">=3.12"
            dependencies = ["anneal-geo"]

            [project.entry-points."anneal_geo.estimators"]
            probe = "anneal_geo_trust_probe:ProbeEstimator"
            heavy = "anneal_geo_trust_probe.heavy:HeavyEstimator"

            [project.entry-points."anneal_geo.backbones"]
            stem13 = "anneal_geo_trust_probe:Stem13Backbone"

            [tool.hatch.build.targets.wheel]
            packages = ["anneal_geo_trust_probe"]
            """
        ),
        encoding="utf-8",
    )
    return source


@pytest.fixture(scope="module")
def installed(tmp_path_factory, pip_install) -> dict[str, Path]:
    """``probe`` 0.1.0 and 0.2.0, and the broken-plugin fixture, each in its own folder."""
    root = tmp_path_factory.mktemp("probe")
    targets = {}
    for version in ("0.1.0", "0.2.0"):
        targets[version] = root / f"site-{version}"
        pip_install(probe_distribution(root, version), targets[version])
    targets["broken"] = root / "site-broken"
    pip_install(ROOT / "tests" / "fixtures" / "broken_plugin", targets["broken"])
    return targets


def cli(*args: str, path: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(path), env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [str(EXE), *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600
    )


def one_line_error(result: subprocess.CompletedProcess[str], *parts: str) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    message = result.stderr.strip()
    assert "Traceback" not in message and len(message.splitlines()) == 1, message
    for part in parts:
        assert part in message, message
    return message


def settings_of(directory: Path) -> dict:
    return tomllib.loads((directory / "session.toml").read_text(encoding="utf-8"))


# -- options ----------------------------------------------------------------------------------


def test_option_values_are_toml_scalars():
    assert parse_value("3") == 3 and parse_value("0.5") == 0.5 and parse_value("true") is True
    assert parse_value('"3"') == "3" and parse_value("centroid") == "centroid"
    assert parse_value("[16, 32]") == [16, 32] and parse_value("1e-3") == 0.001
    assert parse_assignments(["k=3", "pick = centroid"], "--x") == {"k": 3, "pick": "centroid"}
    with pytest.raises(ConfigError, match="--selector-option 'k3' must be KEY=VALUE"):
        parse_assignments(["k3"], "--selector-option")


def test_every_installed_plugin_refuses_an_unknown_option_listing_the_accepted_ones():
    for group in plugins.GROUPS:
        for name in plugins.names(group):
            with pytest.raises(ConfigError) as info:
                plugins.create(group, name, seed=0, bogus_setting=3)
            message = str(info.value)
            assert f"{group[:-1]} '{name}' has no option 'bogus_setting'" in message
            assert "it accepts:" in message and "\n" not in message
    # The base classes refuse them too, when a plugin is built directly.
    with pytest.raises(ConfigError, match="has no option 'kk'; it accepts: threshold"):
        MGUEEstimator(kk=3)


def test_options_reach_plugins_from_the_command_line_and_a_config_file(pool_dir, tmp_path):
    config = tmp_path / "settings.toml"
    config.write_text(
        "budget = 5\nknn_k = 7\n[selector_options]\nniter = 5\n[estimator_options]\n"
        'threshold = "gaussian"\n',
        encoding="utf-8",
    )
    out = tmp_path / "s"
    result = cli("run", "--data", str(pool_dir), *QUICK, "--config", str(config), "--budget",
                 "9", "--estimator-option", "threshold=midpoint", "--selector-option",
                 "pick=centroid", "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    document = settings_of(out)
    assert document["settings"]["budget"] == 9  # the command line wins
    assert document["settings"]["knn_k"] == 7  # the file gives the rest
    assert document["selector_options"] == {"niter": 5, "pick": "centroid"}
    assert document["estimator_options"] == {"threshold": "midpoint"}
    assert document["plugins"]["selector"]["options"] == {"niter": 5, "pick": "centroid"}

    config.write_text("budgett = 5\n", encoding="utf-8")
    one_line_error(
        cli("run", "--data", str(pool_dir), "--config", str(config), "--out", str(tmp_path / "t")),
        f"--config {config}: unknown setting(s) budgett",
    )
    assert not (tmp_path / "t").exists()


def test_plugins_show_describes_a_plugin():
    result = cli("plugins", "show", "mgue")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "estimator plugin 'mgue': anneal_geo.estimators.mgue:MGUEEstimator" in out
    assert "from:         anneal-geo " in out and "estimator contract version 1" in out
    assert "needs_labels=True, symmetric=True, uses_embeddings=True" in out
    assert "MGUE: uncertainty" in out
    assert "--estimator-option KEY=VALUE" in out
    assert "  threshold (str), default 'balanced': " in out and '"gaussian"' in out
    assert "options:      none" in cli("plugins", "show", "topk").stdout
    one_line_error(cli("plugins", "show", "nosuch"), "no plugin named 'nosuch'")


# -- provenance -------------------------------------------------------------------------------


def test_provenance_is_recorded_a_version_change_is_said_and_a_missing_plugin_named(
    installed, pool_dir, tmp_path
):
    out = tmp_path / "s"
    args = ["--data", str(pool_dir), "--rounds", "1", "--initial", "6", "--budget", "4",
            "--epochs", "1", "--estimator", "probe", "--estimator-option", "scale=2"]  # fmt: skip
    first = cli("run", *args, "--out", str(out), path=installed["0.1.0"])
    assert first.returncode == 0, first.stderr
    recorded = settings_of(out)["plugins"]
    assert recorded["estimator"] == {
        "name": "probe",
        "target": "anneal_geo_trust_probe:ProbeEstimator",
        "distribution": "anneal-geo-trust-probe",
        "version": "0.1.0",
        "contract_version": 1,
        "options": {"scale": 2},
    }
    assert recorded["backbone"]["distribution"] == "anneal-geo"

    upgraded = cli("resume", str(out), "--rounds", "1", path=installed["0.2.0"])
    assert upgraded.returncode == 0, upgraded.stderr
    assert (
        "note: estimator 'probe' is now anneal-geo-trust-probe 0.2.0; this session last ran it "
        "as anneal-geo-trust-probe 0.1.0" in upgraded.stderr
    )
    recorded = settings_of(out)["plugins"]["estimator"]
    assert recorded["version"] == "0.2.0" and recorded["versions_used"] == ["0.1.0", "0.2.0"]
    quiet = cli("resume", str(out), "--rounds", "1", path=installed["0.2.0"])
    assert quiet.returncode == 0 and "note:" not in quiet.stderr  # said once, not every time

    missing = cli("resume", str(out), "--rounds", "1")
    one_line_error(
        missing,
        "estimator 'probe' is not installed; this session ran it from anneal-geo-trust-probe "
        "0.2.0: install that distribution (pip install 'anneal-geo-trust-probe==0.2.0')",
    )


# -- backbone errors name the backbone ---------------------------------------------------------


def test_a_backbone_that_cannot_take_the_bands_is_named_before_a_session_exists(
    installed, pool_dir, tmp_path
):
    out = tmp_path / "s"
    result = cli("run", "--data", str(pool_dir), *QUICK, "--backbone", "stem13", "--bands",
                 "B04,B03,B02", "--out", str(out), path=installed["0.1.0"])  # fmt: skip
    one_line_error(
        result,
        "backbone plugin 'stem13' (anneal_geo_trust_probe:Stem13Backbone, from "
        "anneal-geo-trust-probe 0.1.0): forward() raised RuntimeError on input (2, 3, 64, 64)",
    )
    assert not out.exists()


class NaNTrunk(nn.Module):
    def __init__(self, out_dim: int, give: int, nan: bool) -> None:
        super().__init__()
        self.out_dim, self.give, self.nan = out_dim, give, nan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.mean(dim=(2, 3))[:, :1].repeat(1, self.give)
        return out * float("nan") if self.nan else out


class NaNBackbone(Backbone):
    """Features with NaN."""

    trainable = False

    def build(self, bands, mean, std):
        return NaNTrunk(4, 4, nan=True)


class ShortBackbone(Backbone):
    """Says out_dim 6, gives 4 features."""

    trainable = False

    def build(self, bands, mean, std):
        return NaNTrunk(6, 4, nan=False)


@pytest.mark.parametrize(
    ("cls", "expected"),
    [
        (NaNBackbone, "forward() returned NaN or infinite features"),
        (ShortBackbone, "forward() returned (2, 4), expected (2, 6)"),
    ],
)
def test_backbone_features_are_checked_in_every_forward(pool, cls, expected):
    plugins.register(cls, name="odd-trunk", group="backbones")
    try:
        with pytest.raises(PluginError) as info:
            check_settings(SessionConfig(backbone="odd-trunk", initial=6, rounds=0), pool)
        message = str(info.value)
        assert message.startswith("backbone plugin 'odd-trunk'") and expected in message
        # The wrapping stays on the module: training and embedding go through it too.
        module = plugins.create("backbones", "odd-trunk").checked_build(
            pool.bands, pool.band_mean.tolist(), pool.band_std.tolist()
        )
        with pytest.raises(PluginError, match="odd-trunk"):
            module(torch.from_numpy(pool.float_patches([0, 1, 2])))
        assert set(module.state_dict()) == set(cls().build([], [], []).state_dict())
    finally:
        plugins.unregister("odd-trunk", "backbones")


# -- plugins check --conformance ---------------------------------------------------------------


def test_plugins_check_conformance_runs_the_kit(installed):
    both = os.pathsep.join(str(installed[k]) for k in ("0.1.0", "broken"))
    loads = cli("plugins", "check", "broken-shape", path=Path(both))
    assert loads.returncode == 0 and ": ok" in loads.stdout  # loading alone cannot see it
    kit = cli("plugins", "check", "broken-shape", "--conformance", path=Path(both))
    assert kit.returncode == 1, kit.stdout + kit.stderr
    assert "conformance: FAILED" in kit.stdout and "'fit and score'" in kit.stdout
    assert "score() output has shape" in kit.stdout
    assert "skipped deterministic: not run: the 'fit and score' check failed" in kit.stdout

    heavy = cli("plugins", "check", "heavy", "--conformance", path=Path(both))
    assert heavy.returncode == 1
    assert "light import: importing anneal_geo_trust_probe.heavy imports torch" in heavy.stdout

    good = cli("plugins", "check", "probe", "--conformance", "--option", "scale=3",
               path=Path(both))  # fmt: skip
    assert good.returncode == 0, good.stdout + good.stderr
    assert "conformance checks passed" in good.stdout and "note time: fit on" in good.stdout


# -- the kit's new checks ---------------------------------------------------------------------


class SeedsGlobally(MGUEEstimator):
    """MGUE that reseeds numpy's global generator (a common mistake)."""

    def score(self, embeddings, pairs):
        np.random.seed(self.seed)  # noqa: NPY002 - the mistake under test
        return super().score(embeddings, pairs) + 0.0 * np.random.rand(len(pairs))  # noqa: NPY002


class ReadsGlobalState(MGUEEstimator):
    """MGUE whose tie-breaking reads numpy's global state without drawing from it."""

    def score(self, embeddings, pairs):
        offset = float(np.random.get_state()[1][0] % 7)  # noqa: NPY002
        return super().score(embeddings, pairs) + offset


def test_estimators_must_leave_and_ignore_the_global_random_state():
    for cls, detail in (
        (SeedsGlobally, "changed numpy's or Python's global random state"),
        (ReadsGlobalState, "different global numpy/random/torch seeds"),
    ):
        with pytest.raises(ConformanceError) as info:
            check_estimator(cls)
        assert "'only its own seed'" in str(info.value).splitlines()[0]
        assert detail in str(info.value)


class GlobalNumpyInit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.out_dim = 3
        # Weights from numpy's global generator: the same twice in a row only by chance.
        self.register_buffer("w", torch.from_numpy(np.random.rand(3).astype(np.float32)))  # noqa: NPY002

    def forward(self, x):
        return x.mean(dim=(2, 3))[:, :1] * self.w


class GlobalNumpyBackbone(Backbone):
    """Initialised from numpy's global state."""

    trainable = False

    def build(self, bands, mean, std):
        np.random.seed(self.seed)  # noqa: NPY002 - deterministic, but clobbers the caller's state
        return GlobalNumpyInit()


class RefusesRGB(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.out_dim = 2
        self.channels = channels

    def forward(self, x):
        if x.shape[1] == 3:
            raise ValueError("three channels are not supported")
        return x.mean(dim=(2, 3))[:, :2]


class RGBlessBackbone(Backbone):
    """Fails on three bands at forward time."""

    trainable = False

    def build(self, bands, mean, std):
        return RefusesRGB(len(bands))


def test_backbone_checks_name_the_band_set_and_the_global_state():
    with pytest.raises(ConformanceError) as info:
        check_backbone(GlobalNumpyBackbone)
    assert "only its own seed" in str(info.value)
    with pytest.raises(ConformanceError) as info:
        check_backbone(RGBlessBackbone)
    text = str(info.value)
    assert "'band subsets'" in text.splitlines()[0]
    assert "band subsets: on RGB B04,B03,B02 (B04,B03,B02): forward() raised ValueError" in text


class FitCrashes(Estimator):
    """Crashes in fit."""

    def fit(self, embeddings, pairs, labels):
        raise RuntimeError("no")

    def score(self, embeddings, pairs):
        return np.zeros(len(pairs))


def test_checks_after_a_failed_core_check_are_listed_as_skipped():
    with pytest.raises(ConformanceError) as info:
        check_estimator(FitCrashes)
    text = str(info.value)
    assert "'fit and score'" in text.splitlines()[0]
    for name in ("inputs unchanged", "deterministic", "only its own seed", "fit on one class"):
        assert f"skipped {name}: not run: the 'fit and score' check failed" in text, name


class BrokenMGUE(MGUEEstimator):
    """MGUE with a score of the wrong length."""

    def score(self, embeddings, pairs):
        return super().score(embeddings, pairs)[1:]


def test_a_subclass_of_an_installed_plugin_is_reported_under_its_own_name():
    plugins.load("estimators", "mgue")  # the registry names the parent class
    with pytest.raises(ConformanceError) as info:
        check_estimator(BrokenMGUE)
    first = str(info.value).splitlines()[0]
    assert first.startswith(f"plugin {__name__}:BrokenMGUE failed"), first
    assert "mgue" not in str(info.value).split("failed")[0]
    with pytest.raises(PluginError, match=rf"^plugin {__name__}:BrokenMGUE: score\(\) output"):
        est = BrokenMGUE()
        est.checked_score(np.eye(4, dtype=np.float32), np.array([[0, 1], [2, 3]]))


def test_the_report_says_how_long_the_main_calls_took():
    report = check_estimator(MGUEEstimator)
    assert "fit on" in report.notes["time"] and "score 3000 pairs" in report.notes["time"]
    assert "only its own seed" in report.passed
    assert "note time:" in str(report)
