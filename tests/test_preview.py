"""`m3-curate preview`: the HTML page from cached findings or from the experts, a template file
no task names yet, errors on the page, and the page opened in headless Chromium."""

from __future__ import annotations

import argparse
import html
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from render_factory import Demo, build_demo

from curation.store.cache import FindingsCache, content_hash
from curation.cli import main
from curation.errors import CurationError
from curation.ingest import readers_for
from curation.manifest import BuildSpec
from curation.build.plan import spec_json
from curation.preview import preview_command
from curation.render.renderer import Renderer
from curation.render.templates import BUILTIN_PROMPTS
from expert_runners.base import ExpertInput, make_runner

BUNDLES = Path(__file__).resolve().parents[1] / "expert_runners" / "demo_bundles"

CHROMIUM = Path("/usr/bin/chromium")
TASKS = [
    {"template": "vista3d/segment_and_answer.j2", "source": "ct", "expert": "VISTA3D", "args": ["everything", "organs"]},
    {"template": "findings/volume.j2", "source": "ct", "expert": "CT_TISSUE", "args": ["everything"]},
    {"template": "cxr/expert_hint_vqa.j2", "source": "cxr", "expert": "CXR"},
    {"template": "qa/plain.j2", "source": "vqa", "expert": "PICTURE"},
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    return build_demo(tmp_path_factory.mktemp("preview"))


@pytest.fixture
def manifest(demo: Demo, tmp_path: Path) -> Path:
    data = demo.spec.model_dump(mode="json")
    data["experts"] = [e for e in data["experts"] if e["runner"] != "brats"]
    data["tasks"] = TASKS
    data["output"]["dir"] = str(tmp_path / "out")
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run(manifest: Path, html: Path, **kw) -> None:
    args = {"manifest": str(manifest), "task": None, "template": None, "n": 2, "html": str(html), "out": None, **kw}
    preview_command(argparse.Namespace(**args))


def fill_build_cache(demo: Demo, out: Path) -> None:
    """What a build leaves: VISTA3D findings of the CT items, under the build's keys."""
    spec = next(e for e in demo.spec.experts if e.name == "VISTA3D")
    runner, reader, cache = make_runner(spec), readers_for(demo.spec)["ct"], FindingsCache(out / "internal" / "cache")
    for item in demo.items_of("ct"):
        for args in ("everything", "organs"):
            f = runner.run(ExpertInput(item, reader.load(item), reader.load_labels(item)), args)
            cache.put(content_hash(item, reader.root), runner.fingerprint(), f, args)


@pytest.mark.slow
def test_page_from_cache_and_experts(demo: Demo, manifest: Path, tmp_path: Path, capsys) -> None:
    fill_build_cache(demo, tmp_path / "out")
    page = tmp_path / "p.html"
    run(manifest, page)
    text = page.read_text()
    assert "8 conversation(s) from 4 task(s), 0 error(s)" in capsys.readouterr().out
    for t in TASKS:
        assert f"<h2>{t['template']}</h2>" in text
    assert text.count("class='sample'") == 8
    assert text.count("findings from build cache") == 2 and text.count("findings from expert run") == 6  # qa/plain: the picture expert
    images = int(re.search(r"data-images='(\d+)'", text)[1])
    assert images == text.count("<img ") == 2 * 2 + 2 * 2 + 2 * 1 + 2 * 1  # volume: the slice, then the result
    assert "<summary>model card</summary>" in text and "<summary>template source</summary>" in text
    assert "<summary>findings</summary>" in text and "&quot;question_kind&quot;" in text
    run(manifest, page)
    again = page.read_text()
    assert again.count("findings from preview cache") == 6 and "findings from expert run" not in again
    assert not (tmp_path / "out" / "internal" / "cache" / make_runner(demo.spec.experts[1]).fingerprint()).exists()  # build cache untouched


def record_vista3d(demo: Demo, out: Path, args: list[str]) -> None:
    """What a build records of VISTA3D when its tasks give it `args`."""
    spec = next(e for e in demo.spec.experts if e.name == "VISTA3D")
    runner = make_runner(spec)
    FindingsCache(out / "internal" / "cache").register([{"spec": spec_json(spec), "fingerprint": runner.fingerprint(),
                                                         "info": runner.describe(args).to_json()}])


def test_from_what_a_build_recorded_no_runner_is_made(demo: Demo, manifest: Path, tmp_path: Path, monkeypatch) -> None:
    """As `m3-curate render`: the fingerprint a build recorded finds the cached findings without
    constructing the runner (and importing its model code, seconds for MONAI alone), for a
    task of the manifest and for a template file the search sends to the same expert."""
    out = tmp_path / "out"
    fill_build_cache(demo, out)
    record_vista3d(demo, out, ["everything", "organs"])
    monkeypatch.setattr("expert_runners.base.make_runner", lambda *a, **k: pytest.fail("preview constructed a runner"))
    page = tmp_path / "p.html"
    run(manifest, page, task="vista3d/segment_and_answer.j2")
    text = page.read_text()
    assert text.count("findings from build cache") == 2 and "findings from expert run" not in text
    mine = tmp_path / "drafts" / "segment_draft.j2"
    mine.parent.mkdir()
    mine.write_text((BUILTIN_PROMPTS / "vista3d" / "segment_and_answer.j2").read_text())
    run(manifest, page, template=str(mine), n=2)
    text = page.read_text()
    assert "expert VISTA3D" in text and text.count("findings from build cache") == 2 and "class='error'" not in text


def test_a_record_without_an_arguments_vocabulary_asks_the_runner(demo: Demo, manifest: Path, tmp_path: Path, monkeypatch) -> None:
    """A task changed since the build (an argument its tasks did not give) would render with no
    vocabulary for that argument from the build's record: the runner describes it instead."""
    from expert_runners import base

    record_vista3d(demo, tmp_path / "out", ["everything"])
    made = []
    monkeypatch.setattr(base, "make_runner", lambda *a, **k: made.append(a[0].name) or make_runner(*a, **k))
    run(manifest, tmp_path / "p.html", task="vista3d/segment_and_answer.j2")  # everything, organs
    assert made == ["VISTA3D"]


def test_a_record_of_a_runner_that_reports_no_names_is_complete(demo: Demo, manifest: Path, tmp_path: Path, monkeypatch) -> None:
    """A runner without vocabularies (the picture runner, CXR) has nothing a record could lack:
    its record describes any argument without the runner being made (hashing its weights)."""
    from curation.preview import _Expert
    from curation.manifest import load_manifest

    spec = load_manifest(manifest)
    picture = next(e for e in spec.experts if e.name == "PICTURE")
    info = make_runner(picture).describe([""])
    assert not info.vocabularies
    cache = FindingsCache(tmp_path / "cache")
    cache.register([{"spec": spec_json(picture), "fingerprint": info.fingerprint, "info": info.to_json()}])
    monkeypatch.setattr("expert_runners.base.make_runner", lambda *a, **k: pytest.fail("preview constructed a runner"))
    assert _Expert(spec, "PICTURE", cache).describe(["", "anything"]) == info


def test_an_items_findings_are_read_and_serialised_once_for_all_its_samples(demo: Demo, manifest: Path, tmp_path: Path,
                                                                           monkeypatch) -> None:
    """Three tasks ask about the same expert result of each item: preview hashes the item's files,
    reads the result and serialises it once per item (the renderer's data shown on the page),
    not once per sample; the page shows the findings as before."""
    import html
    import json
    from collections import Counter

    from curation import preview as preview_module
    from curation.findings import Findings

    data = yaml.safe_load(manifest.read_text())
    data["tasks"] = [{"template": t, "source": "ct", "expert": "VISTA3D", "args": ["everything"]}
                     for t in ("vista3d/segment_and_answer.j2", "findings/presence.j2", "findings/side.j2")]
    manifest.write_text(yaml.safe_dump(data))
    fingerprint = make_runner(next(e for e in demo.spec.experts if e.name == "VISTA3D")).fingerprint()
    reader, cache = readers_for(demo.spec)["ct"], FindingsCache(tmp_path / "out" / "internal" / "cache")
    found = [demo.findings[(item.item_id, "VISTA3D", "everything")] for item in demo.items_of("ct")[:2]]
    for item, f in zip(demo.items_of("ct"), found):
        cache.put(content_hash(item, reader.root), fingerprint, f, "everything")

    calls: Counter[str] = Counter()
    hashed, get, to_dict = preview_module.content_hash, FindingsCache.get, Findings.to_dict
    monkeypatch.setattr(preview_module, "content_hash", lambda *a: calls.update(["hash"]) or hashed(*a))
    monkeypatch.setattr(FindingsCache, "get", lambda self, *a: calls.update(["get"]) or get(self, *a))
    monkeypatch.setattr(Findings, "to_dict", lambda self, **kw: calls.update(["to_dict"]) or to_dict(self, **kw))
    page = tmp_path / "p.html"
    run(manifest, page, n=2)
    assert calls == {"hash": 2, "get": 2, "to_dict": 2}
    monkeypatch.undo()
    text = page.read_text()
    assert text.count("findings from build cache") == 6 and "class='error'" not in text
    for f in found:
        shown = json.dumps({k: v for k, v in f.to_dict().items() if k != "timing"}, indent=1)
        assert text.count(f"<summary>findings</summary><pre>{html.escape(shown, quote=True)}</pre>") == 3


def test_one_task_and_a_template_file_no_task_names(demo: Demo, manifest: Path, tmp_path: Path) -> None:
    page = tmp_path / "p.html"
    run(manifest, page, task="cxr/expert_hint_vqa.j2", n=3)
    assert page.read_text().count("class='sample'") == 3 and "<h2>qa/plain.j2</h2>" not in page.read_text()
    mine = tmp_path / "drafts" / "tumour_draft.j2"
    mine.parent.mkdir()
    mine.write_text((BUILTIN_PROMPTS / "vista3d" / "tumor_presence.j2").read_text().replace("{{ follow_up }}", "So how many? {{ follow_up }}"))
    run(manifest, page, template=str(mine), n=2)
    text = page.read_text()
    assert "<h2>tumour_draft.j2</h2>" in text and "expert VISTA3D, args [&#x27;hepatic tumor&#x27;" in text
    assert text.count("class='sample'") == 2 and "class='error'" not in text


def test_a_template_file_goes_only_to_an_expert_whose_options_give_what_it_needs(demo: Demo, tmp_path: Path) -> None:
    """BRATS without sequence pictures (`sequence_images: false`) cannot give four_sequences'
    `sequence`: what an expert gives is asked of the configured runner, not of its class."""
    from curation.preview import _Expert, _task_for

    def spec(sequence_images: bool) -> BuildSpec:
        data = demo.spec.model_dump(mode="json")
        data["experts"] = [{"name": "CT_TISSUE", "runner": "ct_tissue"},
                           {"name": "BRATS", "runner": "brats", "bundle": str(BUNDLES / "brats_demo"),
                            "options": {"sequence_images": sequence_images}}]
        data["tasks"] = [{"template": "findings/volume.j2", "source": "ct", "expert": "CT_TISSUE"}]
        return BuildSpec.model_validate(data)

    def task(s: BuildSpec) -> str | None:
        return _task_for(s, Renderer(s), "brats/four_sequences.j2", lambda name: _Expert(s, name, FindingsCache(tmp_path))).expert

    assert task(spec(True)) == "BRATS"
    with pytest.raises(CurationError, match="no source and expert of manifest .* fit its declaration"):
        task(spec(False))


def test_template_errors_show_on_the_page(manifest: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.j2"
    bad.write_text("{#- declare\nkind: bad\nsources: [image2d]\nneeds: [classes]\ncalls_expert: false\nimages: 0\n-#}\n"
                   '{% turn "user" %}{{ model_card }}{{ findings.nope }}{% endturn %}{% turn "assistant" %}x{% endturn %}\n')
    page = tmp_path / "p.html"
    run(manifest, page, template=str(bad))
    text = page.read_text()
    assert text.count("class='error'") == 2 and "template bad.j2, line 8: &#x27;dict object&#x27; has no attribute &#x27;nope&#x27;" in text


def test_a_skip_is_shown_as_a_skip_not_a_failure(manifest: Path, tmp_path: Path, capsys) -> None:
    """A template that sets an item aside on purpose (`skip()`) is counted by a build as skipped;
    the preview shows it so, and exits 0."""
    draft = tmp_path / "choosy.j2"
    draft.write_text("{#- declare\nkind: choosy\nsources: [image2d]\nneeds: [classes]\ncalls_expert: false\nimages: 0\n-#}\n"
                     '{{ skip("nothing to ask about here") }}{% turn "user" %}q{% endturn %}{% turn "assistant" %}a{% endturn %}\n')
    page = tmp_path / "p.html"
    assert main(["-q", "preview", str(manifest), "--template", str(draft), "-n", "2", "--html", str(page)]) == 0
    text = page.read_text()
    assert "class='error'" not in text and text.count("class='skip'") == 2 and "skipped: nothing to ask about here" in text
    assert "0 error(s), 2 skipped by their template" in capsys.readouterr().out


def test_a_plugin_expert_is_carded_as_the_runner_it_derives_from(demo: Demo, tmp_path: Path) -> None:
    """A plug-in runner deriving from a built-in one (ct_tissue) has no card of its own: the
    build lists it on the model card under its family's card, and so must the preview, which
    used to refuse its calling task and show a card without it."""
    data = demo.spec.model_dump(mode="json")
    data["experts"] = [{"name": "TISSUE", "runner": "build_helpers:CountingTissueRunner"}]
    data["tasks"] = [{"template": "findings/volume.j2", "source": "ct", "expert": "TISSUE", "args": ["everything"]}]
    data["output"]["dir"] = str(tmp_path / "out")
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(data))
    spec = BuildSpec.model_validate(data)
    card = Renderer(spec, experts={"TISSUE": make_runner(spec.experts[0]).describe(["everything"])}).model_card
    assert "TISSUE" in card
    page = tmp_path / "p.html"
    run(path, page, n=1)
    text = page.read_text()
    assert "class='error'" not in text and html.escape(card.strip(), quote=True).splitlines()[0] in text


def test_command_line(manifest: Path, tmp_path: Path, capsys) -> None:
    assert main(["-q", "preview", str(manifest), "--task", "qa/plain.j2", "-n", "1", "--html", str(tmp_path / "x.html")]) == 0
    assert main(["-q", "preview", str(manifest), "--task", "nope.j2", "--html", str(tmp_path / "x.html")]) == 2
    assert "--task 'nope.j2': no task of manifest 'render-test' uses it" in capsys.readouterr().err
    with pytest.raises(CurationError, match="--template: file not found"):
        run(manifest, tmp_path / "x.html", template=str(tmp_path / "missing.j2"))


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install -y chromium)")
def test_page_opens_in_headless_chromium_with_its_images(manifest: Path, tmp_path: Path) -> None:
    page = tmp_path / "p.html"
    run(manifest, page, n=1)
    total = int(re.search(r"data-images='(\d+)'", page.read_text())[1])
    flags = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars", "--window-size=1280,1600"]
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", page.as_uri()], check=True, capture_output=True, timeout=120)
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], check=True, capture_output=True, text=True, timeout=120).stdout
    assert f'data-images-loaded="{total}"' in dom and f"{total} of {total} images loaded" in dom
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (1600, 1280)
    # The page itself is grey; saturated colour can only come from the overlays, drawn once loaded.
    saturated = int(((pixels.max(axis=2) - pixels.min(axis=2)) > 80).sum())
    assert saturated > 2000, f"only {saturated} coloured pixels in the screenshot: the overlay images did not load"
    shutil.copy(shot, tmp_path / "kept.png")


def test_pictures_sit_side_by_side_with_captions_that_say_what_they_are(manifest: Path, tmp_path: Path) -> None:
    page = tmp_path / "p.html"
    run(manifest, page, task="vista3d/segment_and_answer.j2", n=1)
    text = page.read_text()
    assert re.search(r"<figcaption>1: key slice, slice \d+</figcaption>", text)
    assert re.search(r"<figcaption>2: overlay, slice \d+</figcaption>", text)
    assert re.search(r"<span class='slot'>2: overlay, slice \d+</span>", text)  # where the picture stands in the turn
    assert ".pictures { display: flex" in text


def test_a_failed_sample_fails_the_command(manifest: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.j2"
    bad.write_text("{#- declare\nkind: bad\nsources: [image2d]\nneeds: [classes]\ncalls_expert: false\nimages: 0\n-#}\n"
                   '{% turn "user" %}{{ model_card }}{{ findings.nope }}{% endturn %}{% turn "assistant" %}x{% endturn %}\n')
    page = tmp_path / "p.html"
    assert main(["preview", str(manifest), "--template", str(bad), "-n", "2", "--html", str(page), "-q"]) == 1
    assert "2 error(s)" in capsys.readouterr().out
    text = page.read_text()
    assert text.count("class='sample failed'") == 2 and "data-failed='2'" in text and "2 sample(s) failed" in text


@pytest.mark.slow
def test_a_page_the_file_system_refuses_is_one_line_and_no_partial_page(manifest: Path, tmp_path: Path) -> None:
    """A full disk (here a file-size limit: the same failing write, with EFBIG): the page is
    written whole or not at all, and the line names it."""
    import os
    import resource
    import signal
    import sys

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    from curation.cli import main

    assert main(["-q", "preview", str(manifest), "-n", "2", "--html", str(tmp_path / "first.html")]) == 0  # the findings cached
    assert (tmp_path / "first.html").stat().st_size > 20_000
    page = tmp_path / "page" / "p.html"
    done = subprocess.run([sys.executable, "-m", "curation", "-q", "preview", str(manifest), "-n", "2", "--html", str(page)],
                          capture_output=True, text=True, preexec_fn=small_files, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1] == (
        f"m3-curate: error: cannot write {page}: File too large (the file exceeds the size limit of this process or file system)"), done.stderr[-2000:]
    assert not any(page.parent.iterdir())


def test_watch_on_a_port_in_use_says_so_before_rendering(manifest: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    import socket

    from curation import preview_watch
    from curation.cli import main

    monkeypatch.setattr(preview_watch, "_render", lambda *a: pytest.fail("rendered before the port was known to be free"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["-q", "preview", str(manifest), "-n", "1", "--html", str(tmp_path / "p.html"), "--watch", "--port", str(port)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"m3-curate: error: --port {port}: cannot serve on 127.0.0.1 there (Address already in use): give another port, or 0 for "
        "any free one")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install -y chromium)")
def test_watch_serves_the_page_and_a_saved_template_edit_shows_in_the_browser(manifest: Path, tmp_path: Path) -> None:
    """A person's loop: the page open in a browser, a template edited and saved, the new text on
    the page without touching the browser; a template that breaks shows as the page, and the
    fix brings the samples back."""
    import os
    import signal
    import sys

    from chromium import Chromium

    draft = tmp_path / "drafts" / "watch_draft.j2"
    draft.parent.mkdir()
    original = (BUILTIN_PROMPTS / "qa" / "plain.j2").read_text()
    draft.write_text(original.replace("{{ first.question }}", "Draft wording one. {{ first.question }}", 1))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    server = subprocess.Popen([sys.executable, "-m", "curation", "preview", str(manifest), "--template", str(draft), "-n", "1",
                               "--html", str(tmp_path / "live.html"), "--watch", "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    browser = None
    try:
        url = None
        for line in server.stdout:  # type: ignore[union-attr]
            if line.startswith("serving "):
                url = line.split()[1]
                break
        assert url and url.startswith("http://127.0.0.1:"), "the server did not start"
        browser = Chromium(url, tmp_path / "profile")
        body = "document.body ? document.body.innerText : ''"
        assert "Draft wording one." in browser.wait_for(f"({body}).includes('Draft wording one.') && ({body})")

        time.sleep(0.05)
        draft.write_text(original.replace("{{ first.question }}", "Draft wording two, saved. {{ first.question }}", 1))
        text = browser.wait_for(f"({body}).includes('Draft wording two, saved.') && ({body})")
        assert text and "Draft wording one." not in text

        draft.write_text(original.replace("{% endturn %}", "{% endturn", 1))  # does not compile
        assert "watch_draft.j2" in browser.wait_for(f"document.body.getAttribute('data-failed') === '1' && ({body})")
        draft.write_text(original.replace("{{ first.question }}", "Draft wording three. {{ first.question }}", 1))
        assert browser.wait_for(f"({body}).includes('Draft wording three.')")
        assert browser.evaluate("document.body.getAttribute('data-failed')") == "0"
    finally:
        if browser is not None:
            browser.close()
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    assert server.returncode == 130
