"""The CXR ensemble on real (tiny) networks saved to disk: TorchScript files and a MONAI
DenseNet121 state dict, checked against running the same files by hand."""

from __future__ import annotations

import io
import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import DenseNet121
from PIL import Image as PILImage

from curation.demo.cxr import cxr_phantom
from curation.errors import CurationError, ItemError
from curation.items import StudyItem, Volume
from curation.manifest import ExpertSpec
from expert_runners.base import ExpertInput, make_runner
from expert_runners.cxr import CXR_LABELS, CxrEnsembleRunner

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning",
                                        "ignore:`torch.jit.load` is deprecated:DeprecationWarning",
                                        "ignore:.torch.load. received a zip file:UserWarning")

SUBSET = ["Pneumothorax", "Effusion", "Atelectasis"]
EIGHT = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Fracture", "Lung Opacity", "Pneumonia"]


class SmallNet(torch.nn.Module):
    def __init__(self, outputs: int, scale: float = 1.0):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.head = torch.nn.Linear(4, outputs)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x * self.scale))
        return self.head(x.mean(dim=(2, 3)))


class Constant(torch.nn.Module):
    """Fixed logits whatever the image: for exact threshold checks."""

    def __init__(self, logits: list[float]):
        super().__init__()
        self.register_buffer("logits", torch.tensor([logits]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits + 0.0 * x.mean()


def save_script(module: torch.nn.Module, path: Path) -> Path:
    torch.jit.script(module.eval()).save(str(path))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cxr_models")
    torch.manual_seed(0)
    save_script(SmallNet(18), folder / "all.ts")
    save_script(SmallNet(len(SUBSET), scale=1 / 1024), folder / "subset.ts")
    torch.save(DenseNet121(spatial_dims=2, in_channels=1, out_channels=18).state_dict(), folder / "densenet.pt")
    return folder


def spec(models: Path, entries: list, **options) -> ExpertSpec:
    return ExpertSpec(name="CXR", runner="cxr_ensemble", bundle=models, models=entries, options=options)


ENTRIES = [
    {"path": "all.ts", "kind": "torchscript", "size": 32},
    {"path": "subset.ts", "kind": "torchscript", "labels": SUBSET, "size": 48, "normalise": "xrv"},
    {"path": "densenet.pt", "kind": "monai_densenet", "labels": EIGHT, "size": 64, "crop": "center"},
]


def xray_input(item_id: str = "cxr-1", modality: str = "CR") -> ExpertInput:
    image = cxr_phantom(0, 0).image  # (row, column) uint8
    array = np.ascontiguousarray(image[:, 16:].T)  # (x, y), not square: 240 columns × 256 rows
    item = StudyItem(item_id=item_id, patient_key="p", study_key="s", source="demo", kind="image2d", modality=modality,
                     shape=list(array.shape), spacing=[1.0, 1.0], n_files=1, uris=[f"{item_id}.png"])
    return ExpertInput(item, Volume(array, np.eye(4)))


@pytest.fixture(scope="module")
def ensemble_runner(models) -> CxrEnsembleRunner:
    r = make_runner(spec(models, ENTRIES), image_max_side=64)
    assert isinstance(r, CxrEnsembleRunner)
    r.setup("cpu")
    return r


def by_hand(models: Path, inp: ExpertInput) -> dict[str, float]:
    """The specification, written out: [0, 1] scaling, crop, resize, sigmoid, per-label mean."""
    rows_cols = torch.from_numpy(inp.volume.array.T.astype(np.float32) / 255.0)

    def prepared(size: int, crop: bool = False) -> torch.Tensor:
        img = rows_cols
        if crop:  # 256 rows × 240 columns → the central 240 × 240
            img = img[8:248, :]
        return F.interpolate(img[None, None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)

    net = DenseNet121(spatial_dims=2, in_channels=1, out_channels=18)
    net.load_state_dict(torch.load(models / "densenet.pt", weights_only=True))
    with torch.no_grad():
        p_all = torch.sigmoid(torch.jit.load(str(models / "all.ts"))(prepared(32)))[0]
        p_sub = torch.sigmoid(torch.jit.load(str(models / "subset.ts"))(prepared(48) * 2048 - 1024))[0]
        p_dn = torch.sigmoid(net.eval()(prepared(64, crop=True)))[0]
    votes: dict[str, list[float]] = {label: [float(p_all[i])] for i, label in enumerate(CXR_LABELS)}
    for i, label in enumerate(SUBSET):
        votes[label].append(float(p_sub[i]))
    for label in EIGHT:
        votes[label].append(float(p_dn[CXR_LABELS.index(label)]))
    return {label: sum(v) / len(v) for label, v in votes.items()}


def test_mean_over_assigned_models_matches_by_hand(models, ensemble_runner):
    inp = xray_input()
    findings = ensemble_runner.run(inp)
    expected = by_hand(models, inp)
    assert [c.name for c in findings.classes] == list(CXR_LABELS)
    for c in findings.classes:
        assert c.probability == pytest.approx(expected[c.name], abs=2e-6), c.name
        assert c.present == (c.probability > 0.5) and c.threshold == 0.5
    d = json.loads(json.dumps(findings.to_dict()))
    assert d["classes"][9]["name"] == "Pleural_Thickening" and d["structures"] == []
    assert {"load", "preprocess", "inference", "postprocess"} <= set(findings.timing)
    png = PILImage.open(io.BytesIO(findings.images[0].png))
    assert findings.images[0].kind == "key_slice" and max(png.size) == 64 and png.size[0] < png.size[1]


def test_threshold_is_strictly_above(tmp_path):
    zero = save_script(Constant([0.0] * 18), tmp_path / "zero.ts")  # p = 0.5 for every label
    high = save_script(Constant([math.log(3.0)]), tmp_path / "high.ts")  # p = 0.75
    entries = [{"path": str(zero), "size": 16}, {"path": str(high), "labels": ["atelectasis"], "size": 16}]
    classes = {c.name: c for c in make_runner(spec(tmp_path, entries)).run(xray_input()).classes}
    assert classes["Atelectasis"].probability == pytest.approx(0.625) and classes["Atelectasis"].present
    assert classes["Edema"].probability == 0.5 and not classes["Edema"].present
    strict = {c.name: c for c in make_runner(spec(tmp_path, entries, threshold=0.7)).run(xray_input()).classes}
    assert not strict["Atelectasis"].present and strict["Atelectasis"].threshold == 0.7


def test_torch_export_member(tmp_path):
    net = SmallNet(18).eval()
    program = torch.export.export(net, (torch.zeros(1, 1, 24, 24),))
    torch.export.save(program, str(tmp_path / "net.pt2"))
    save_script(net, tmp_path / "net.ts")
    exported = make_runner(spec(tmp_path, [{"path": "net.pt2", "kind": "torch_export", "size": 24}])).run(xray_input())
    scripted = make_runner(spec(tmp_path, [{"path": "net.ts", "size": 24}])).run(xray_input())
    assert [c.probability for c in exported.classes] == pytest.approx([c.probability for c in scripted.classes], abs=2e-6)


def test_labels_nobody_votes_on_are_left_out(models):
    r = make_runner(spec(models, [{"path": "subset.ts", "labels": SUBSET, "size": 16}]))
    assert [c.name for c in r.run(xray_input()).classes] == ["Atelectasis", "Pneumothorax", "Effusion"]


def test_corrupt_model_file_is_named(tmp_path):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a model at all")
    r = make_runner(spec(tmp_path, [{"path": "broken.pt", "kind": "torchscript"}]))
    with pytest.raises(CurationError, match=rf"cannot load models\[0\] \({bad}\) as torchscript"):
        r.setup("cpu")
    with pytest.raises(ItemError, match=rf"^cxr-7: expert CXR failed: .*{bad}"):
        r.run(xray_input("cxr-7"))


def test_wrong_kind_and_wrong_width_are_named(models, tmp_path):
    r = make_runner(spec(models, [{"path": "all.ts", "kind": "monai_densenet"}]))
    with pytest.raises(CurationError, match=r"cannot load models\[0\] .*all.ts\) as monai_densenet"):
        r.setup("cpu")
    r = make_runner(spec(models, [{"path": "subset.ts", "labels": ["Edema"], "size": 16}]))
    with pytest.raises(ItemError, match=r"^cxr-1: .*models\[0\] .*subset.ts\) gives 3 outputs; expected 18 .* or 1"):
        r.run(xray_input())


def test_fingerprint_follows_weight_files(tmp_path):
    path = save_script(SmallNet(18), tmp_path / "m.ts")
    before = make_runner(spec(tmp_path, [{"path": "m.ts"}])).fingerprint()
    assert make_runner(spec(tmp_path, [{"path": "m.ts"}])).fingerprint() == before
    torch.manual_seed(1)
    save_script(SmallNet(18), path)
    assert make_runner(spec(tmp_path, [{"path": "m.ts"}])).fingerprint() != before


@pytest.mark.parametrize("entries, message", [
    ([], "needs `models:`"),
    ([{"path": "missing.ts"}], "missing.ts does not exist \\(relative paths resolve against expert `bundle`"),
    ([{"path": "all.ts", "labels": ["Pneumonitis"]}], "'Pneumonitis' is not one of the 18 CXR labels"),
    ([{"path": "all.ts", "kind": "onnx"}], "kind must be one of"),
    ([{"path": "all.ts", "sise": 224}], "unknown key\\(s\\) \\['sise'\\]"),
    ([{"path": "all.ts", "normalise": "imagenet"}], "normalise must be one of"),
], ids=["no-models", "missing-file", "bad-label", "bad-kind", "typo", "bad-normalise"])
def test_manifest_entries_validated(models, entries, message):
    with pytest.raises(CurationError, match=message):
        make_runner(spec(models, entries))


def test_relative_path_without_bundle_is_cwd_relative(models, monkeypatch):
    monkeypatch.chdir(models)
    r = make_runner(ExpertSpec(name="CXR", runner="cxr_ensemble", models=[{"path": "all.ts"}]))
    assert r.weight_files() == [models / "all.ts"]


def test_other_modalities_refused(ensemble_runner):
    with pytest.raises(ItemError, match="^ct-2: CXR takes CR/DX, not CT"):
        ensemble_runner.run(xray_input("ct-2", modality="CT"))


def test_torchxrayvision_missing_says_how_to_install(models, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchxrayvision", None)  # import fails as if not installed
    with pytest.raises(CurationError, match="pip install torchxrayvision"):
        make_runner(spec(models, [{"kind": "torchxrayvision", "weights": "densenet121-res224-all"}]))


def test_torchxrayvision_member_from_local_cache(models, tmp_path, monkeypatch):
    """A stand-in `torchxrayvision` with the package's interface (model_urls, get_model,
    `pathologies` with blanks): the member is found in the cache, never downloaded, and votes
    only on the labels its model has."""
    url = "https://example.invalid/v1/chex-densenet121.pt"
    targets = [label if label in ("Edema", "Effusion") else "" for label in CXR_LABELS]

    class Calibrated(torch.nn.Module):
        pathologies = targets

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            assert x.shape == (1, 1, 224, 224) and x.min() >= -1024 and x.max() <= 1024
            return torch.full((1, 18), 0.8)

    fake = types.ModuleType("torchxrayvision")
    fake.models = types.SimpleNamespace(model_urls={"densenet121-res224-chex": {"weights_url": url, "labels": targets}},
                                        get_model=lambda name: Calibrated())
    monkeypatch.setitem(sys.modules, "torchxrayvision", fake)
    monkeypatch.setenv("HOME", str(tmp_path))
    entries = [{"kind": "torchxrayvision", "weights": "densenet121-res224-chex"}, {"path": "all.ts", "size": 16}]
    with pytest.raises(CurationError, match="never downloads"):
        make_runner(spec(models, entries))
    cache = tmp_path / ".torchxrayvision" / "models_data"
    cache.mkdir(parents=True)
    (cache / "chex-densenet121.pt").write_bytes(b"weights")
    r = make_runner(spec(models, entries))
    assert r.weight_files()[0] == cache / "chex-densenet121.pt"
    classes = {c.name: c.probability for c in r.run(xray_input()).classes}
    alone = {c.name: c.probability for c in make_runner(spec(models, entries[1:])).run(xray_input()).classes}
    assert classes["Edema"] == pytest.approx((0.8 + alone["Edema"]) / 2, abs=2e-6)
    assert classes["Mass"] == alone["Mass"]
