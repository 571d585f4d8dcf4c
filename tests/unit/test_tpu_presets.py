"""TPU presets (tpu_configs/*.yaml): loading, self-consistency, real meshes on fake devices, errors."""

import copy
import os
from pathlib import Path

import pytest

from xtrainer import tpu_presets
from xtrainer.sharding import MeshConfig
from xtrainer.tpu_presets import (
    TpuPresetError,
    check_against_devices,
    list_presets,
    load_preset,
    preset_from_dict,
)
from xtrainer.training_args import TrainingArguments

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "tpu_configs"

# name -> (chips, JAX devices, hosts = TPU VM workers). The accelerator-type suffix counts TensorCores on
# v4/v5p (2 per chip, one megacore device per chip) and chips on v5e/v6e.
EXPECTED = {
    "v4-8": (4, 4, 1),
    "v4-32": (16, 16, 4),
    "v5e-1": (1, 1, 1),
    "v5litepod-4": (4, 4, 1),
    "v5litepod-8": (8, 8, 1),
    "v5litepod-16": (16, 16, 4),
    "v5litepod-256": (256, 256, 64),
    "v5p-8": (4, 4, 1),
    "v5p-128": (64, 64, 16),
    "v6e-1": (1, 1, 1),
    "v6e-8": (8, 8, 1),
    "v6e-256": (256, 256, 64),
}
SMALL = [name for name, (_, devices, _) in EXPECTED.items() if devices <= 8]


@pytest.fixture
def isolated_dirs(monkeypatch):
    """Only the repo's tpu_configs/ (no $XTRAINER_TPU_CONFIGS from the caller's environment)."""
    monkeypatch.delenv(tpu_presets.ENV_DIRS, raising=False)


def _raw(name="v5p-8"):
    import yaml

    return yaml.safe_load((REPO_CONFIGS / f"{name}.yaml").read_text())


# ---------------------------------------------------------------------------------------------- the presets


def test_every_required_preset_is_there(isolated_dirs):
    assert set(EXPECTED) <= set(list_presets())
    assert {p.stem for p in REPO_CONFIGS.glob("*.yaml")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_loads_and_is_self_consistent(name, isolated_dirs):
    preset = load_preset(name)
    chips, devices, hosts = EXPECTED[name]
    assert (preset.chips, preset.devices, preset.hosts) == (chips, devices, hosts)
    assert preset.name == name and preset.path == str(REPO_CONFIGS / f"{name}.yaml")
    assert preset.chips * preset.devices_per_chip == preset.devices
    assert preset.hosts * preset.devices_per_host == preset.devices
    assert preset.devices_per_chip == 1  # megacore on v4/v5p; one TensorCore per chip on v5e/v6e
    assert preset.tensorcores_per_chip == (2 if preset.generation in ("v4", "v5p") else 1)
    config = preset.mesh_config()
    assert isinstance(config, MeshConfig)
    assert config.data * config.fsdp * config.tensor == preset.devices
    assert MeshConfig.resolve(preset.mesh_dict(), preset.devices) == config  # usable as args.mesh
    assert preset.num_slices == 1 and set(preset.dcn_mesh.values()) == {1}
    assert preset.env["PJRT_DEVICE"] == "TPU"
    assert all("\n" not in value for value in preset.env.values())
    if preset.devices > 1:
        assert "--xla_enable_async_all_gather=true" in preset.env["LIBTPU_INIT_ARGS"]
    assert preset.notes and preset.sources and preset.summary().startswith(preset.accelerator_type)


def test_accelerator_suffix_counts_tensorcores_on_v4_and_v5p_and_chips_on_v5e_v6e(isolated_dirs):
    assert load_preset("v4-8").accelerator_type == "v4-8" and load_preset("v4-8").chips == 4
    assert load_preset("v5p-128").chips == 64
    assert load_preset("v5litepod-16").chips == 16 and load_preset("v6e-8").chips == 8
    assert load_preset("v5e-1").accelerator_type == "v5litepod-1"  # the Colab TPU runtime's Cloud name


@pytest.mark.parametrize("name", SMALL)
def test_small_presets_build_a_real_jax_mesh(name, isolated_dirs):
    jax = pytest.importorskip("jax")
    from xtrainer.backends.jax.mesh import build_mesh

    assert jax.device_count() == 8, "tests/conftest.py should give JAX 8 fake CPU devices"
    preset = load_preset(name)
    mesh = build_mesh(preset.mesh_config(), jax.devices()[: preset.devices])
    assert dict(mesh.shape) == preset.mesh_dict()
    assert mesh.devices.size == preset.devices
    check_against_devices(preset, preset.devices, 1)  # what a matching machine passes


# ---------------------------------------------------------------------------------------------- errors


def test_mismatch_error_names_preset_expected_and_found(isolated_dirs):
    with pytest.raises(TpuPresetError) as info:
        check_against_devices(load_preset("v5p-128"), 8, 1)
    text = str(info.value)
    for part in ("tpu_config='v5p-128'", "64 devices", "16 host processes", "found 8 devices in 1 process"):
        assert part in text, text
    with pytest.raises(ValueError, match=r"expects 1 host process .*found 4 devices in 4 processes"):
        check_against_devices(load_preset("v5p-8"), 4, 4)


def test_unknown_preset_lists_the_valid_names(isolated_dirs):
    with pytest.raises(ValueError) as info:
        load_preset("v9-1024")
    text = str(info.value)
    assert "Unknown tpu_config='v9-1024'" in text
    assert all(name in text for name in EXPECTED)
    with pytest.raises(ValueError, match="no such preset file"):
        load_preset("/nonexistent/custom.yaml")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.update(devices=8), "chips x devices_per_chip = 4 x 1 = 4, but devices = 8"),
        (lambda d: d.update(hosts=2), "hosts x devices_per_host = 2 x 4 = 8, but devices = 4"),
        (lambda d: d["mesh"]["ici"].update(fsdp=8), "covers 8 devices, but devices = 4"),
        (lambda d: d["mesh"]["ici"].update(model=2), "unknown axes ['model']"),
        (lambda d: d["mesh"]["ici"].update(fsdp=-1), "presets give exact sizes"),
        (lambda d: d.update(accelerator_type="v5p-4"), "suffix counts tensorcores per slice, so it should be 8"),
        (lambda d: d.update(topology="2x2x2"), "topology 2x2x2 has 8 chips per slice"),
        (lambda d: d.update(name="other"), "must match"),
        (lambda d: d.update(chip_count=4), "unknown keys: ['chip_count']"),
        (lambda d: d.pop("hosts"), "missing keys: ['hosts']"),
        (lambda d: d.update(env={"LIBTPU_INIT_ARGS": 3}), "env must map"),
        (lambda d: d.update(batch={"per_device_train_batch_size": 0}), "batch may hold"),
        (lambda d: d.update(schema_version=2), "reads version 1"),
    ],
)
def test_validation_reports_what_is_wrong(change, message):
    data = copy.deepcopy(_raw("v5p-8"))
    change(data)
    with pytest.raises(TpuPresetError) as info:
        preset_from_dict(data, path="v5p-8.yaml", expect_name="v5p-8")
    assert message in str(info.value)


def test_multislice_preset_multiplies_ici_by_dcn():
    data = _raw("v6e-256")
    data.update(name="2xv6e-256", chips=512, devices=512, hosts=128, num_slices=2)
    data["mesh"] = {"ici": {"fsdp": 256}, "dcn": {"data": 2}}
    preset = preset_from_dict(data)
    assert preset.mesh_config() == MeshConfig(data=2, fsdp=256, tensor=1)
    data["mesh"]["dcn"] = {"data": 1}
    data["mesh"]["ici"] = {"data": 2, "fsdp": 256}
    with pytest.raises(TpuPresetError, match="mesh.dcn spans 1 slices but num_slices = 2"):
        preset_from_dict(data)


# ---------------------------------------------------------------------------------------------- lookup


def test_env_dirs_come_first_and_paths_load(tmp_path, monkeypatch):
    import yaml

    custom = _raw("v5p-8")
    custom.update(name="v5p-8", notes="my override")
    (tmp_path / "v5p-8.yaml").write_text(yaml.safe_dump(custom))
    extra = dict(_raw("v5e-1"), name="my-chip")
    (tmp_path / "my-chip.yaml").write_text(yaml.safe_dump(extra))
    monkeypatch.setenv(tpu_presets.ENV_DIRS, str(tmp_path))
    assert load_preset("v5p-8").notes == "my override"  # $XTRAINER_TPU_CONFIGS wins over the repo
    assert "my-chip" in list_presets() and "v6e-256" in list_presets()
    assert load_preset(str(tmp_path / "my-chip.yaml")).name == "my-chip"


def test_installed_wheel_location_is_searched(tmp_path, monkeypatch):
    import yaml

    share = tmp_path / "share" / "xtrainer" / "tpu_configs"
    share.mkdir(parents=True)
    (share / "wheel-chip.yaml").write_text(yaml.safe_dump(dict(_raw("v6e-1"), name="wheel-chip")))
    monkeypatch.delenv(tpu_presets.ENV_DIRS, raising=False)
    monkeypatch.setattr(tpu_presets.sys, "prefix", str(tmp_path))
    assert share in tpu_presets.search_dirs()
    assert load_preset("wheel-chip").devices == 1


def test_apply_env_sets_only_missing_variables(monkeypatch):
    data = dict(_raw("v5e-1"), env={"XTRAINER_TEST_A": "1", "XTRAINER_TEST_B": "new"})
    preset = preset_from_dict(data)
    for name in data["env"]:  # register both with monkeypatch so teardown removes them
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)
    monkeypatch.setenv("XTRAINER_TEST_B", "mine")
    assert preset.apply_env() == {"XTRAINER_TEST_A": "1"}
    assert os.environ["XTRAINER_TEST_B"] == "mine"
    assert preset.apply_env(override=True) == {"XTRAINER_TEST_A": "1", "XTRAINER_TEST_B": "new"}
    assert "export XTRAINER_TEST_A='1'" in preset.env_exports()


# ---------------------------------------------------------------------------------------------- wiring


def test_training_arguments_validate_tpu_config(tmp_path, isolated_dirs):
    args = TrainingArguments(str(tmp_path), tpu_config="v5p-128")
    assert args.tpu_config == "v5p-128" and args.to_dict()["tpu_config"] == "v5p-128"
    with pytest.raises(ValueError, match=r"Unknown tpu_config='v5p-100'\. Valid presets: .*v5p-128"):
        TrainingArguments(str(tmp_path), tpu_config="v5p-100")


def _tiny_flax_model():
    nnx = pytest.importorskip("flax.nnx")
    jnp = pytest.importorskip("jax.numpy")

    class Tiny(nnx.Module):
        def __init__(self):
            self.linear = nnx.Linear(8, 1, rngs=nnx.Rngs(0))

        def __call__(self, x, labels=None):
            y = self.linear(x)[..., 0]
            return {"loss": jnp.mean((y - labels) ** 2), "logits": y}

    return Tiny()


def test_jax_backend_uses_the_preset_mesh_and_checks_devices(tmp_path, isolated_dirs):
    pytest.importorskip("jax")
    import xtrainer

    model = _tiny_flax_model()
    trainer = xtrainer.Trainer(model=model, args=TrainingArguments(str(tmp_path), backend="jax", tpu_config="v6e-8"))
    assert trainer.backend.mesh_config == MeshConfig(data=1, fsdp=8, tensor=1)  # the preset's mesh

    args = TrainingArguments(str(tmp_path), backend="jax", tpu_config="v6e-8", mesh={"data": 2, "fsdp": 4})
    assert xtrainer.Trainer(model=model, args=args).backend.mesh_config == MeshConfig(2, 4, 1)  # args.mesh wins

    with pytest.raises(ValueError, match=r"tpu_config='v5p-8' expects 4 devices .*found 8 devices in 1 process"):
        xtrainer.Trainer(model=model, args=TrainingArguments(str(tmp_path), backend="jax", tpu_config="v5p-8"))
