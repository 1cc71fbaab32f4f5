from pathlib import Path

import pytest

from curation.errors import CurationError
from curation.manifest import load_manifest, manifest_hash

REPO = Path(__file__).resolve().parents[1]


def base() -> dict:
    return {
        "name": "t",
        "sources": [{"name": "ct", "kind": "dicom", "root": "ct"}],
        "experts": [{"name": "CTTissue", "runner": "ct_tissue"}],
        "tasks": [{"template": "x.j2", "source": "ct", "expert": "CTTissue", "weight": 2}],
    }


def test_demo_manifest_loads_and_resolves_paths():
    spec = load_manifest(REPO / "manifests" / "demo.yaml")
    assert spec.name == "demo"
    ct = spec.source("ct")
    assert ct.root == (REPO / "data" / "demo" / "ct").resolve()
    assert ct.labels == (REPO / "data" / "demo" / "ct_labels").resolve()
    assert spec.output.dir == (REPO / "out" / "demo").resolve()


def test_relative_paths_resolve_against_manifest_folder(write_manifest, tmp_path):
    spec = load_manifest(write_manifest(base()))
    assert spec.sources[0].root == tmp_path / "ct"
    assert spec.output.dir == tmp_path / "out" / "t"


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: d["sources"][0].update(rooot="x"), "sources[0].dicom.rooot: unknown key"),
        (lambda d: d.update(sed=3), "sed: unknown key"),
        (lambda d: d["tasks"][0].update(weight="heavy"), "tasks[0].weight"),
        (lambda d: d["tasks"][0].update(source="mri"), "tasks[0].source: no source named 'mri'"),
        (lambda d: d["tasks"][0].update(expert="VISTA"), "tasks[0].expert: no expert named 'VISTA'"),
        (lambda d: d["sources"][0].update(kind="zip"), "sources[0]"),
        (lambda d: d.update(split={"val": 0.6, "test": 0.5}), "val + test must be below 1"),
        (lambda d: d.pop("sources"), "sources: Field required"),
    ],
    ids=["typo-in-source", "typo-top-level", "wrong-type", "dangling-source", "dangling-expert", "bad-kind", "split", "missing"],
)
def test_bad_manifest_is_one_error_naming_file_and_key(write_manifest, mutate, expected):
    data = base()
    mutate(data)
    path = write_manifest(data)
    with pytest.raises(CurationError) as e:
        load_manifest(path)
    message = str(e.value)
    assert message.startswith(str(path))
    assert expected in message
    assert "\n" not in message


def test_missing_and_malformed_manifest(tmp_path):
    with pytest.raises(CurationError, match="manifest not found"):
        load_manifest(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(CurationError, match="not valid YAML"):
        load_manifest(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just text\n")
    with pytest.raises(CurationError, match="mapping"):
        load_manifest(scalar)


def test_manifest_hash_changes_with_content(write_manifest):
    a = load_manifest(write_manifest(base(), "a.yaml"))
    data = base()
    data["seed"] = 99
    b = load_manifest(write_manifest(data, "b.yaml"))
    assert manifest_hash(a) == manifest_hash(load_manifest(write_manifest(base(), "a2.yaml")))
    assert manifest_hash(a) != manifest_hash(b)


def test_manifest_hash_is_the_recipe_wherever_it_is_checked_out(tmp_path):
    """The same manifest in two checkouts (its data beside it, as the demo's) hashes alike, so
    rows built from either are the same, provenance included; a different folder named in it,
    or another absolute path, does not."""
    import yaml

    def recipe(root: str, shared: str = "/srv/shared/brain") -> dict:
        return {"name": "r", "sources": [{"name": "ct", "kind": "dicom", "root": root, "labels": "../ct_labels"},
                                         {"name": "brain", "kind": "nifti", "root": shared}],
                "experts": [{"name": "V", "runner": "vista3d", "bundle": "../models/vista3d"}], "prompts": ["my_prompts"]}

    hashes = []
    for checkout, data in (("one", recipe("../data/ct")), ("two/deeper", recipe("../data/ct")), ("three", recipe("../data/other")),
                           ("four", recipe("../data/ct", shared="/srv/elsewhere"))):
        folder = tmp_path / checkout / "manifests"
        folder.mkdir(parents=True)
        (folder / "m.yaml").write_text(yaml.safe_dump(data))
        hashes.append(manifest_hash(load_manifest(folder / "m.yaml")))
    assert hashes[0] == hashes[1] and len(set(hashes)) == 3


def test_max_pixels_stops_where_pil_stops_decoding(write_manifest):
    """A cap above PIL's own would index pictures that no load can decode: one error on the key."""
    from PIL import Image

    from curation.manifest import PIL_MAX_PIXELS

    assert PIL_MAX_PIXELS == 2 * Image.MAX_IMAGE_PIXELS
    data = {"name": "x", "sources": [{"name": "c", "kind": "image2d", "root": "cxr", "max_pixels": PIL_MAX_PIXELS}]}
    assert load_manifest(write_manifest(data, "ok.yaml")).sources[0].max_pixels == PIL_MAX_PIXELS
    data["sources"][0]["max_pixels"] = PIL_MAX_PIXELS + 1
    with pytest.raises(CurationError, match=r"sources\[0\]\.image2d\.max_pixels: .*at most 178,956,970: pictures are decoded by PIL"):
        load_manifest(write_manifest(data, "big.yaml"))


def readme_manifest() -> str:
    """The YAML example of README's "The manifest" section."""
    section = (REPO / "README.md").read_text().split("## The manifest", 1)[1]
    return section.split("```yaml\n", 1)[1].split("```", 1)[0]


def test_the_readme_manifest_runs_against_the_demo_archive(tmp_path):
    """As the README says: placed in manifests/ beside the demo archive, it loads, passes every
    check a build makes before Ray starts, and indexes the archive's items."""
    from curation.demo import write_demo_archive
    from curation.ingest.index import build_index
    from curation.preflight import preflight

    demo = REPO / "data" / "demo"
    if not (demo / "ground_truth.json").is_file():
        demo = tmp_path / "data" / "demo"
        write_demo_archive(demo, cases=1, seed=0)
    else:
        (tmp_path / "data").mkdir()
        (tmp_path / "data" / "demo").symlink_to(demo)
    (tmp_path / "expert_runners").symlink_to(REPO / "expert_runners")
    (tmp_path / "manifests").mkdir()
    path = tmp_path / "manifests" / "readme.yaml"
    path.write_text(readme_manifest())
    spec = load_manifest(path)
    preflight(spec, path, rows=True)
    index = build_index(spec)
    assert {i.source for i in index.items} == {s.name for s in spec.sources}
    assert spec.output.dir == (tmp_path / "out" / "my-build").resolve() and spec.license == "other"


def test_a_licence_is_a_hub_licence_id(write_manifest):
    data = base()
    data["license"] = "CC BY 4.0"
    with pytest.raises(CurationError, match="license: String should match pattern"):
        load_manifest(write_manifest(data))
