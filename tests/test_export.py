"""Export: BatchNorm folding, ONNX export checked against PyTorch, int8 fidelity on real faces, C arrays, the CLI,
and the MLflow record of every export."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from mlflow.tracking import MlflowClient
from onnx import numpy_helper
from torch import nn

from faceforge import models
from faceforge.cli import main as faceforge
from faceforge.data import load_pairs
from faceforge.data_pipeline import align_tree
from faceforge.eval import embed_images, evaluate_verification
from faceforge.export import (
    EXPORTS_EXPERIMENT,
    FaceCalibrationReader,
    OnnxEmbedder,
    artifact_files,
    equalize_channels,
    export_artifact,
    export_file,
    export_model,
    export_onnx,
    fold_batchnorm,
    int8_fidelity,
    largest_activation,
    list_exports,
    open_calibration_images,
    output_gap,
    quantize,
    quantize_int8,
    resolve_source,
    write_c_array,
)
from faceforge.export.c_array import Activation
from faceforge.export.card import ArtifactCard
from faceforge.export.quantize import CALIBRATION_BATCH, CALIBRATION_METHODS, DEFAULT_CALIBRATION, FIDELITY_BARS
from faceforge.jobs.spec import compose_config
from faceforge.registry import prepare_tracking, select_and_register
from faceforge.registry.selection import SWEEP_TAG
from faceforge.train.checkpoint import load_backbone
from faceforge.train.launch import RUN_ID_FILE, launch
from faceforge.train.tracking import RunTracker

from conftest import CLI_MAIN, run_stopped_inside, shared_data, tiny_config, waiting_behind


def _random_batchnorm_statistics(model: nn.Module) -> nn.Module:
    """Fresh BatchNorms are the identity in eval mode; random statistics make folding do real work."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=generator) * 0.1)
    return model.eval()


def _batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d) for m in model.modules())


def test_fold_batchnorm_keeps_eval_outputs() -> None:
    x = torch.rand(4, 3, 56, 56) * 2 - 1
    mobile = _random_batchnorm_statistics(models.create("mobilefacenet", width=0.25, input_size=56, embedding_dim=32))
    mobile.train()
    folded = fold_batchnorm(mobile)
    assert mobile.training and _batchnorms(mobile) > 0, "the original model is left as it was"
    assert _batchnorms(folded) == 0
    with torch.no_grad():
        expected, actual = mobile.eval()(x), folded(x)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)

    # Equalisation rescales the channels between each conv -> ReLU/PReLU -> conv pair: same function,
    # and each pair ends with equal weight ranges on both sides of every channel.
    equalize_channels(folded)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), expected, rtol=1e-5, atol=1e-5)
    bottleneck = folded.body[2].layers  # expand 1x1 -> depthwise 3x3 -> project 1x1
    expand, depthwise, project = (block[0].weight.abs() for block in bottleneck)
    torch.testing.assert_close(expand.amax(dim=(1, 2, 3)), depthwise.amax(dim=(1, 2, 3)), rtol=1e-2, atol=0)
    torch.testing.assert_close(depthwise.amax(dim=(1, 2, 3)), project.amax(dim=(0, 2, 3)), rtol=1e-2, atol=0)

    # IResNet's pre-activation BatchNorms precede a zero-padded conv: they stay, the rest fold.
    iresnet = _random_batchnorm_statistics(models.create("iresnet18", width=0.25, input_size=56, embedding_dim=32))
    folded = fold_batchnorm(iresnet)
    blocks = sum(isinstance(m, models.iresnet.IBasicBlock) for m in iresnet.modules())
    assert _batchnorms(folded) == blocks + 1  # one per block, and the one closing the body
    with torch.no_grad():
        torch.testing.assert_close(folded(x), iresnet(x), rtol=1e-5, atol=1e-5)


def test_export_onnx_checks_and_matches_pytorch(tmp_path: Path) -> None:
    model = _random_batchnorm_statistics(models.create("mobilefacenet", width=0.25, input_size=56, embedding_dim=32))
    path = export_onnx(model, 56, tmp_path / "model.onnx")
    onnx.checker.check_model(str(path), full_check=True)
    graph = onnx.load(str(path)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param, "the batch dimension is dynamic"
    ops = {node.op_type for node in graph.node}
    assert "BatchNormalization" not in ops
    assert "PRelu" not in ops and {"Relu", "Mul", "Sub"} <= ops, "PReLU is exported as relu(x) - a*relu(-x)"
    for batch in (1, 8):
        assert output_gap(model, path, 56, batch, seed=batch) <= 1e-4


@pytest.mark.parametrize("name", ["mobilefacenet", "iresnet18"])
@torch.no_grad()
def test_card_params_are_those_the_exported_graph_stores(name: str, tmp_path: Path) -> None:
    """Folding trades each BatchNorm's scale and shift for one conv bias; IResNet's pre-activation BatchNorms stay,
    their running statistics stored as weights. The card counts model.onnx's weights, and the trained model's apart."""
    model = _random_batchnorm_statistics(models.create(name, width=0.25, input_size=56, embedding_dim=32))
    generator = torch.Generator().manual_seed(1)
    for param in model.parameters():  # no two equal tensors: the exporter would store them once
        param.add_(torch.randn(param.shape, generator=generator) * 1e-3)
    card = export_artifact(model, "onnx", tmp_path, latency_runs=1)
    stored = onnx.load(str(tmp_path / "model.onnx")).graph.initializer
    weights = sum(int(np.prod(tensor.dims)) for tensor in stored if tensor.data_type == onnx.TensorProto.FLOAT)
    assert card.params == weights
    assert card.trained_params == sum(p.numel() for p in model.parameters()) != weights
    assert json.loads((tmp_path / "card.json").read_text())["trained_params"] == card.trained_params
    assert "trained" in card.summary()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The micro config trained briefly on 40 real identities: BatchNorm statistics and weights of real faces."""
    src = shared_data() / "celeba_ids"
    root = tmp_path_factory.mktemp("celeba40")
    for identity in sorted(p for p in src.iterdir() if p.is_dir())[:40]:
        (root / identity.name).mkdir()
        for image in sorted(identity.glob("*.jpg"))[:6]:
            shutil.copy(image, root / identity.name / image.name)
    shutil.copy(image, root / "cover.jpg")  # loose beside the identities: training, and so calibration, skip it
    out = tmp_path_factory.mktemp("run") / "run"
    cfg = tiny_config(out, root, None, steps=60, checkpoint_every=60)
    cfg.model = compose_config(["model=mobilefacenet_micro"]).model
    cfg.data.batch_size = 16
    cfg.schedule.warmup_steps = 5
    launch(cfg)
    return out / "checkpoints"


def _database(trained: Path) -> str:
    """The MLflow database the training run of `trained` logged to (tiny_config's)."""
    return f"sqlite:///{trained.parent.parent}/mlflow.db"


@pytest.fixture(scope="module")
def c_array_export(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`faceforge export --format c-array`, calibrated on the checkpoint's own training data by default."""
    out = tmp_path_factory.mktemp("export")
    faceforge(["export", str(trained), "--format", "c-array", "--out", str(out), "--tracking-uri", _database(trained)])
    return out


def test_export_cli_writes_artifacts_and_card(c_array_export: Path, trained: Path) -> None:
    names = {p.name for p in c_array_export.iterdir()}
    assert {"model.onnx", "model_int8.onnx", "faceforge_model.c", "faceforge_model.h", "card.json"} <= names
    card = json.loads((c_array_export / "card.json").read_text())
    assert card["format"] == "c-array" and card["model"]["name"] == "mobilefacenet" and card["params"] > 0
    assert card["int8_bytes"] == (c_array_export / "model_int8.onnx").stat().st_size
    int8 = onnx.load(str(c_array_export / "model_int8.onnx")).graph
    weights = {numpy_helper.to_array(t).dtype for t in int8.initializer if len(t.dims) >= 2}
    assert weights == {np.dtype(np.int8)}, "every conv and linear weight is stored as int8"
    assert card["fp32_latency_ms"] > 0 and card["int8_latency_ms"] > 0
    # In float the largest map is the first bottleneck's 2x expansion of the 16-channel stem; in int8 that map
    # is one byte per value (100 KB) and the float input image the application fills (150 KB) is the largest.
    assert largest_activation(c_array_export / "model.onnx").bytes == 4 * 32 * 56 * 56
    assert card["largest_activation"]["shape"] == [1, 3, 112, 112]
    assert card["largest_activation"]["bytes"] == 4 * 3 * 112 * 112 > 32 * 56 * 56
    # 234 training images (some identities have fewer than 6), all read by the 256-image calibration: fidelity is
    # measured on those.
    fidelity = card["int8_fidelity"]
    assert fidelity["faces"] == 128 and fidelity["held_out"] == 0.0
    # How much int8 keeps of a 60-step model varies between machines: on the AMD EPYC VMs its activations reach 100x
    # their spread, MinMax ranges spend the 8 bits on those outliers (mean cosine 0.76) and the default percentile
    # calibration keeps 0.91 (docs/benchmarks.md), where other machines gave a 1st percentile above 0.9. The card
    # must say when it falls short.
    assert -1.0 <= fidelity["p1_cosine"] <= fidelity["mean_cosine"] <= 1.0 and fidelity["mean_cosine"] > 0.5
    below = any(fidelity[key] < bar for key, bar in FIDELITY_BARS.items())
    assert card["int8_calibration"] == DEFAULT_CALIBRATION
    read_back = ArtifactCard(**(card | {"largest_activation": Activation(**card["largest_activation"])}))
    assert ("BELOW the bars" in read_back.summary()) == below

    with pytest.raises(SystemExit, match=r"faceforge export: error: .*neither an existing checkpoint"):
        faceforge(["export", "/nonexistent/checkpoint"])
    with pytest.raises(SystemExit, match=r"faceforge export: error: crop fraction must be in \(0, 1\], got 0\.0"):
        faceforge(["export", str(trained), "--format", "onnx-int8", "--crop-fraction", "0"])  # not "the default"
    with pytest.raises(SystemExit, match=r"^faceforge export: error: unknown calibration method 'bogus'") as bad:
        faceforge(["export", str(trained), "--format", "onnx-int8", "--calibration-method", "bogus"])
    assert "\n" not in str(bad.value.code), "one line"
    with pytest.raises(SystemExit, match=r"faceforge export: error: calibration set .* not found"):
        faceforge(["export", str(trained), "--format", "onnx-int8", "--calibration", "/nonexistent/faces"])
    an_image = next((shared_data() / "lfw").rglob("*.jpg"))
    with pytest.raises(SystemExit, match=r"calibration set .*\.jpg is not a folder or a \.txt list of images"):
        faceforge(["export", str(trained), "--format", "onnx-int8", "--calibration", str(an_image)])


def test_a_failed_export_leaves_the_earlier_one_whole(
    c_array_export: Path, trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Calibration fails after the fp32 model is built: the earlier export must not be mixed with the new model."""
    out = tmp_path / "export"
    shutil.copytree(c_array_export, out)
    (out / "model.onnx").write_bytes(b"the earlier export's model")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    corrupt = tmp_path / "faces" / "person"
    corrupt.mkdir(parents=True)
    for i in range(40):
        (corrupt / f"face{i}.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(SystemExit, match=r"faceforge export: error: .*face\d+\.jpg: not a decodable image"):
        faceforge(["export", str(trained), "--format", "c-array", "--out", str(out), "--calibration",
                   str(tmp_path / "faces"), "--calibration-count", "2", "--crop-fraction", "1.0", "--no-log",
                   "--overwrite"])  # fmt: skip
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "the building folder is removed too"
    # 40 faces in the set, but too few read to trust their ranges
    assert "warning: calibration reads 2 image(s)" in capsys.readouterr().out

    with pytest.raises(
        SystemExit, match=r"export: .*already holds an export \(card\.json, .*\); pass --overwrite to replace it"
    ):
        faceforge(["export", str(trained), "--format", "onnx", "--out", str(out), "--no-log"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    (out / ".building-killed" / "model.onnx").parent.mkdir()  # what an export killed with -9 leaves
    (out / ".building-killed" / "model.onnx").write_bytes(b"half a model")
    faceforge(["export", str(trained), "--format", "onnx", "--out", str(out), "--no-log", "--overwrite"])
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "README.txt").write_text("a folder of mine, no export in it")
    faceforge(["export", str(trained), "--format", "onnx", "--out", str(notes), "--no-log"])
    assert visible(notes) == ["README.txt", "card.json", "model.onnx"]
    assert visible(out) == ["card.json", "model.onnx"], "no int8 files of the last export"


def visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def test_exports_into_one_folder_take_turns(trained: Path, tmp_path: Path) -> None:
    """The default --out is shared by every checkpoint of a backbone: an export waits for the one writing there,
    from its check for an earlier export to its logged run, and never clears a build folder still in use."""
    (tmp_path / ".building-live").mkdir()  # stands for the build folder of the export running
    said: list[str] = []

    def second() -> None:
        export_model(str(trained), "onnx", _database(trained), out=tmp_path, log=False, say=said.append)

    with waiting_behind(tmp_path / ".export.lock", second, settle=1.0) as waiting:
        deadline = time.monotonic() + 120  # the checkpoint loads before the lock: past the settle on a busy machine
        while not said and waiting.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (tmp_path / ".building-live").is_dir() and waiting.is_alive(), "it waits for its turn"
        assert said == [f"waiting for another export into {tmp_path} to finish"]
        (tmp_path / "card.json").write_text("{}")  # the running export's result, moved in just before it ends
        (tmp_path / "model.onnx").write_bytes(b"its model")
    assert isinstance(waiting.error, FileExistsError) and "pass --overwrite" in str(waiting.error)
    assert not (tmp_path / ".building-live").exists() and (tmp_path / "model.onnx").read_bytes() == b"its model"


def test_export_is_logged_to_mlflow_with_its_card(c_array_export: Path, trained: Path, tmp_path: Path) -> None:
    uri = _database(trained)
    [export] = [e for e in list_exports(uri) if e.format == "c-array"]
    assert export.source == str(trained.resolve()) and export.source_run_id is None and export.model_version is None
    assert export.files == {name: (c_array_export / name).stat().st_size for name in artifact_files("c-array")}
    card = json.loads((c_array_export / "card.json").read_text())
    for key in ("params", "trained_params", "macs", "fp32_bytes", "fp32_latency_ms", "int8_bytes", "int8_latency_ms"):
        assert export.metrics[key] == pytest.approx(card[key]), key
    assert export.metrics["largest_activation_bytes"] == card["largest_activation"]["bytes"]
    assert export.metrics["int8_fidelity.mean_cosine"] == pytest.approx(card["int8_fidelity"]["mean_cosine"])
    assert export.params["model.name"] == "mobilefacenet" and export.params["largest_activation.shape"] == "1x3x112x112"
    assert export.params["int8_calibration"] == card["int8_calibration"] == DEFAULT_CALIBRATION
    logged = export_file(uri, export.run_id, "model_int8.onnx")
    assert logged.read_bytes() == (c_array_export / "model_int8.onnx").read_bytes()

    # Only files inside an export run's own artifact directory are handed out.
    outside = tmp_path / "secret.txt"
    outside.write_text("not an artifact")
    (logged.parent / "sneaky").symlink_to(outside)
    for name in ("../../../../mlflow.db", "..", "sneaky", "missing.onnx"):
        with pytest.raises(FileNotFoundError):
            export_file(uri, export.run_id, name)
    training_run = (trained.parent / RUN_ID_FILE).read_text().strip()
    with pytest.raises(FileNotFoundError, match="not an export"):
        export_file(uri, training_run, "config.yaml")
    with pytest.raises(ValueError, match="bad run id"):
        export_file(uri, "../x", "model.onnx")


@pytest.mark.parametrize("uri", ["file:///{tmp}/mlruns", "sqlite:////proc/none/mlflow.db"])
def test_a_tracking_uri_that_cannot_log_is_refused_before_anything_is_written(
    trained: Path, tmp_path: Path, uri: str
) -> None:
    """Found after the whole export, it left files logged nowhere that a corrected rerun then refused to replace."""
    out = tmp_path / "out"
    with pytest.raises((ValueError, OSError)):
        export_model(str(trained), "onnx", uri.format(tmp=tmp_path), out=out)
    assert not out.exists()


def test_a_registered_model_that_is_not_there_leaves_no_database_at_a_mistyped_uri(tmp_path: Path) -> None:
    typo = tmp_path / "hom" / "mlflow.db"
    with pytest.raises((ValueError, OSError)):
        export_model("models:/face/1", "onnx", f"sqlite:///{typo}", out=tmp_path / "out")
    assert not typo.parent.exists()


def test_a_ctrl_c_during_an_export_is_one_line(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = ["export", str(trained), "--format", "onnx", "--out", str(out), "--no-log"]
    result = run_stopped_inside("faceforge.export.artifact:export_onnx", signal.SIGINT, CLI_MAIN, command)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "faceforge export: interrupted before the export was complete; rerun to export" in result.stderr
    assert visible(out) == []


def test_an_int8_export_killed_while_it_calibrates_leaves_nothing_outside_its_out_folder(
    trained: Path, tmp_path: Path
) -> None:
    """onnxruntime's quantiser keeps its augmented model in a temporary folder of its own, which a kill left behind
    in the system's; it now goes with the export's build folder, which the next export into --out clears."""
    out, temporary = tmp_path / "out", tmp_path / "tmp"
    temporary.mkdir()
    command = ["export", str(trained), "--format", "onnx-int8", "--out", str(out), "--no-log"]
    reader = "faceforge.export.quantize:FaceCalibrationReader.get_next"
    result = run_stopped_inside(reader, signal.SIGKILL, CLI_MAIN, command, env={"TMPDIR": str(temporary)})
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert [p.name for p in temporary.iterdir()] in ([], [".ses"])  # .ses: onnxruntime's one session-id file
    assert visible(out) == [] and [p.name for p in out.glob(".building-*/quant-*/ort.quant.*")] != []


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_while_an_export_is_logged_ends_its_run_in_one_line(
    trained: Path, tmp_path: Path, stop: signal.Signals
) -> None:
    """The default SIGTERM killed `faceforge export` mid-log and left its MLflow run RUNNING for good; a Ctrl-C
    there printed a KeyboardInterrupt traceback. The run now ends FAILED, and the export says how to log it."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    command = ["export", str(trained), "--format", "onnx", "--out", str(tmp_path / "out"), "--tracking-uri", uri]
    result = run_stopped_inside("mlflow.tracking:MlflowClient.log_artifact", stop, CLI_MAIN, command)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"stopped by {stop.name}" in result.stderr and "--overwrite" in result.stderr, result.stderr[-3000:]
    [run] = MlflowClient(uri).search_runs([prepare_tracking(uri, EXPORTS_EXPERIMENT)])
    assert run.info.status == "FAILED"


def test_export_of_a_registered_version_links_to_it(trained: Path, tmp_path: Path) -> None:
    """The export run points at the version and run it came from, and the card carries that run's accuracy."""
    uri = _database(trained)
    client = MlflowClient(uri)
    run_id = client.create_run(prepare_tracking(uri, "tests"), tags={SWEEP_TAG: "sweep-export"}).info.run_id
    client.log_metric(run_id, "eval.accuracy", 0.875)
    client.log_metric(run_id, "eval.eer", 0.125)
    model = load_backbone(trained)
    RunTracker(uri, run_id).model(model, model.input_size, step=1)
    client.set_terminated(run_id)
    _, version = select_and_register(uri, "sweep-export", name="exported")

    faceforge(["export", "models:/exported@champion", "--out", str(tmp_path / "fp32"), "--tracking-uri", uri])
    card = json.loads((tmp_path / "fp32" / "card.json").read_text())
    assert card["accuracy"] == {"accuracy": 0.875, "eer": 0.125} and card["int8_bytes"] is None
    assert card["int8_calibration"] is None
    [export] = [e for e in list_exports(uri) if e.model_name == "exported"]
    assert (export.model_version, export.source_run_id) == (version.version, run_id)
    assert export.source == "models:/exported@champion" and export.format == "onnx"
    assert export.metrics["eval.accuracy"] == 0.875 and "int8_latency_ms" not in export.metrics
    assert "int8_calibration" not in export.params
    assert list(export.files) == ["model.onnx", "card.json"]

    quiet = tmp_path / "quiet"
    faceforge(["export", f"models:/exported/{version.version}", "--out", str(quiet), "--tracking-uri", uri, "--no-log"])
    assert (quiet / "model.onnx").is_file() and len([e for e in list_exports(uri) if e.model_name == "exported"]) == 1
    assert resolve_source(uri, f"runs:/{run_id}/model").run_id == run_id


def test_micro_config_fits_250_kb_as_int8(c_array_export: Path) -> None:
    card = json.loads((c_array_export / "card.json").read_text())
    assert card["model"]["width"] == 0.25, "the fixture exported configs/model/mobilefacenet_micro.yaml"
    assert card["int8_bytes"] <= 250_000


@pytest.mark.parametrize("method", sorted(set(CALIBRATION_METHODS) - {DEFAULT_CALIBRATION}))
def test_export_records_another_calibration_method(method: str, trained: Path, tmp_path: Path) -> None:
    """The c-array export above uses the default; this one names another, on the same 234 training images (once
    batches of 16 and a last one of 10)."""
    out = tmp_path / "export"
    faceforge(["export", str(trained), "--format", "onnx-int8", "--calibration-method", method, "--out", str(out),
               "--no-log"])  # fmt: skip
    card = json.loads((out / "card.json").read_text())
    assert card["int8_calibration"] == method and card["int8_fidelity"]["faces"] > 0


@pytest.fixture(scope="module")
def verifying_micro(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The micro config trained as the demo trains its models, on ArcFace-aligned CelebA crops, to about 0.75 LFW
    accuracy; (its checkpoints, aligned LFW). Int8 is judged on a model that verifies: one near chance, such as the
    60-step model above, has so many pairs at its threshold that any perturbation of its embeddings moves its
    accuracy by more than half a point (0.7 point at int8 cosine 0.999 on all of LFW)."""
    aligned = tmp_path_factory.mktemp("aligned")
    align_tree(shared_data() / "celeba_ids", aligned / "celeba", min_face_size=32, progress=False)
    align_tree(shared_data() / "lfw", aligned / "lfw", min_face_size=60, fallbacks=("haar", "center"), progress=False)
    out = tmp_path_factory.mktemp("micro") / "run"
    recipe = ["model=mobilefacenet_micro", "head=cosface", "head.s=32", "head.m3=0.35", "trainer=demo", "eval=none"]
    cfg = compose_config(
        [
            *recipe,
            "trainer.steps=600",
            "trainer.checkpoint_every=600",
            f"data.root={aligned / 'celeba'}",
            "data.crop_fraction=1.0",
            f"mlflow.tracking_uri=sqlite:///{out.parent}/mlflow.db",
            "mlflow.log_model=false",
        ],
        output_dir=str(out),
    )
    launch(cfg)
    return out / "checkpoints", aligned / "lfw"


def test_int8_keeps_a_trained_micro_models_lfw_accuracy(verifying_micro: tuple[Path, Path], tmp_path: Path) -> None:
    """The c-array artifact over all 6,000 LFW pairs (5,203 faces): embeddings keep their direction, and
    verification accuracy holds."""
    checkpoints, lfw = verifying_micro
    out = tmp_path / "export"
    faceforge(["export", str(checkpoints), "--format", "c-array", "--out", str(out), "--no-log"])
    vset = load_pairs(shared_data() / "lfw" / "pairs.txt", lfw)
    assert len(vset.images) >= 500

    embed = dict(input_size=112, crop_fraction=1.0, batch_size=64)
    fp32 = embed_images(OnnxEmbedder(out / "model.onnx"), vset.images, **embed)
    int8 = embed_images(OnnxEmbedder(out / "model_int8.onnx"), vset.images, **embed)
    cosine = (fp32 * int8).sum(axis=1)
    assert cosine.mean() >= 0.99 and np.percentile(cosine, 1) >= 0.97, (cosine.mean(), np.percentile(cosine, 1))
    fp32_accuracy = evaluate_verification(fp32, vset)["accuracy"]
    assert fp32_accuracy >= 0.65, "the premise: a model well above chance"
    assert fp32_accuracy - evaluate_verification(int8, vset)["accuracy"] <= 0.005


def test_c_array_holds_the_model_bytes(c_array_export: Path, tmp_path: Path) -> None:
    data = (model_int8 := c_array_export / "model_int8.onnx").read_bytes()
    header = (c_array_export / "faceforge_model.h").read_text()
    assert f"#define FACEFORGE_MODEL_LEN {len(data)}u" in header
    assert f"#define FACEFORGE_MODEL_LARGEST_ACTIVATION_BYTES {4 * 3 * 112 * 112}u" in header
    with pytest.raises(ValueError, match="C symbol"):
        write_c_array(c_array_export / "model_int8.onnx", tmp_path, largest_activation(model_int8), symbol="2fast")
    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    # The array must equal the file byte for byte, at a 16-byte aligned address.
    (tmp_path / "check.c").write_text(
        '#include <stdint.h>\n#include <stdio.h>\n#include "faceforge_model.h"\n'
        "int main(int argc, char **argv) {\n"
        '  FILE *f = fopen(argv[1], "rb");\n'
        "  unsigned int n = 0; int c;\n"
        "  if (argc != 2 || !f || (uintptr_t)faceforge_model % 16) return 2;\n"
        "  while ((c = fgetc(f)) != EOF) { if (n >= FACEFORGE_MODEL_LEN || faceforge_model[n] != c) return 3; n++; }\n"
        "  return !(n == faceforge_model_len && sizeof faceforge_model == FACEFORGE_MODEL_LEN);\n"
        "}\n"
    )
    binary = tmp_path / "check"
    sources = [str(tmp_path / "check.c"), str(c_array_export / "faceforge_model.c")]
    subprocess.run(
        [cc, "-std=c11", "-Wall", "-Werror", "-I", str(c_array_export), *sources, "-o", str(binary)], check=True
    )
    assert subprocess.run([str(binary), str(c_array_export / "model_int8.onnx")]).returncode == 0


def test_compaction_keeps_int8_outputs_bit_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _random_batchnorm_statistics(models.create("mobilefacenet", width=0.25, input_size=56, embedding_dim=32))
    fp32 = export_onnx(model, 56, tmp_path / "model.onnx")
    faces = open_calibration_images(shared_data() / "celeba_ids")

    def quantise(path: Path) -> Path:
        return quantize_int8(fp32, path, FaceCalibrationReader(faces, input_size=56, crop_fraction=0.75, count=8))

    compacted = quantise(tmp_path / "compact.onnx")
    monkeypatch.setattr(quantize, "compact_qdq", lambda graph: graph)  # quantize_static's own output, to compare
    original = quantise(tmp_path / "original.onnx")
    assert compacted.stat().st_size < 0.9 * original.stat().st_size
    onnx.checker.check_model(str(compacted))
    graph = onnx.load(str(compacted)).graph
    assert len(graph.initializer) < len(onnx.load(str(original)).graph.initializer)  # all-zero zero points gone
    assert max(len(t.name) for t in graph.initializer) <= 3 and not graph.value_info
    batch = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (4, 3, 56, 56)).astype(np.float32))
    assert np.array_equal(OnnxEmbedder(compacted)(batch), OnnxEmbedder(original)(batch))
    # PReLU runs in float between QDQ pairs (onnxruntime has no int8 Neg or Sub): the first one's 32x28x28 float
    # buffers outweigh the 3x56x56 float input, which is all the int8 tensors of a ReLU model would leave.
    for int8 in (compacted, original):
        assert largest_activation(int8).shape == (1, 32, 28, 28)
        assert largest_activation(int8).bytes == 4 * 32 * 28 * 28 > 4 * 3 * 56 * 56
    assert not list(tmp_path.glob("ort-*")), "onnxruntime's optimised copy is removed"


@pytest.mark.parametrize("method", sorted(CALIBRATION_METHODS))
def test_every_calibration_method_takes_an_uneven_image_count(
    method: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """20 faces used to come in batches of 16 and 4; onnxruntime's histogram calibrators stack each tensor's batches
    into one array and failed on them (ValueError: inhomogeneous shape). Their line per batch stays off the console."""
    model = _random_batchnorm_statistics(models.create("mobilefacenet", width=0.25, input_size=56, embedding_dim=32))
    fp32 = export_onnx(model, 56, tmp_path / "model.onnx")
    faces = open_calibration_images(shared_data() / "celeba_ids")
    reader = FaceCalibrationReader(faces, input_size=56, crop_fraction=0.75, count=20)
    capsys.readouterr()
    int8 = quantize_int8(fp32, tmp_path / "int8.onnx", reader, method)
    assert "Collecting tensor data" not in capsys.readouterr().out
    onnx.checker.check_model(str(int8))
    fidelity = int8_fidelity(fp32, int8, reader, count=8)
    assert -1.0 <= fidelity["p1_cosine"] <= fidelity["mean_cosine"] <= 1.0
    with pytest.raises(ValueError, match=r"unknown calibration method 'bogus'; expected"):
        quantize_int8(fp32, tmp_path / "bogus.onnx", reader, "bogus")


def test_calibration_batches_are_equal_and_read_every_image() -> None:
    """onnxruntime takes calibration batches of one size only: nothing is dropped or padded to get them."""
    faces = open_calibration_images(shared_data() / "celeba_ids")
    for count, size in ((3, 3), (16, 16), (17, 1), (20, 10), (234, 13), (256, 16)):
        reader = FaceCalibrationReader(faces, input_size=56, crop_fraction=0.75, count=count)
        assert [len(batch) for batch in reader.batches] == [size] * (count // size), count
        assert np.array_equal(np.concatenate(reader.batches), reader.indices) and len(reader) == count
        assert reader.batch_size == size <= CALIBRATION_BATCH
    reader = FaceCalibrationReader(faces, input_size=56, crop_fraction=0.75, count=20)
    reader.set_range(10, 20)  # what onnxruntime's strided collection asks for: the second batch of 10, then nothing
    assert reader.get_next()["input"].shape == (10, 3, 56, 56) and reader.get_next() is None


def test_int8_fidelity_is_measured_on_faces_calibration_did_not_read(tmp_path: Path) -> None:
    faces = open_calibration_images(shared_data() / "celeba_ids")
    reader = FaceCalibrationReader(faces, input_size=56, crop_fraction=0.75, count=8)

    def squeezenet(name: str) -> Path:  # each call draws new random weights
        model = models.create("squeezenet", width=0.25, input_size=56, embedding_dim=32)
        return export_onnx(_random_batchnorm_statistics(model), 56, tmp_path / f"{name}.onnx")

    first, other = squeezenet("first"), squeezenet("other")
    same = int8_fidelity(first, first, reader, count=20)
    assert same["mean_cosine"] == pytest.approx(1.0, abs=1e-6) and same["faces"] == 20 and same["held_out"] == 1.0
    assert int8_fidelity(first, other, reader, count=20)["mean_cosine"] < 0.9  # unrelated embeddings


def test_calibration_sets(tmp_path: Path) -> None:
    lfw = shared_data() / "lfw"
    files = sorted(lfw.glob("A*/*.jpg"))[:5]
    listing = tmp_path / "faces.txt"
    listing.write_text("# aligned faces\n" + "\n".join(str(p) for p in files) + "\n")
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in files:
        shutil.copy(path, flat / path.name)
    for source in (listing, flat):
        reader = FaceCalibrationReader(open_calibration_images(source), input_size=56, crop_fraction=0.5, count=3)
        batch = reader.get_next()["input"]
        assert batch.shape == (3, 3, 56, 56) and batch.min() >= -1 and batch.max() <= 1
        assert reader.get_next() is None
    with pytest.raises(FileNotFoundError, match="calibration set"):
        open_calibration_images(tmp_path / "missing")
    with pytest.raises(ValueError, match="count"):
        FaceCalibrationReader(open_calibration_images(flat), input_size=56, crop_fraction=0.5, count=0)
    (flat / "thumbs").mkdir()
    shutil.copy(files[0], flat / "thumbs" / files[0].name)
    with pytest.raises(ValueError, match=r"holds both images \(5\) and folders"):
        open_calibration_images(flat)
