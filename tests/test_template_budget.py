"""Templates cannot exhaust memory or hang: every loop, call, filter, operator and output draws on
one step budget and every value has a size cap (`curation.render.budget`). Each hostile
template runs through the real renderer in its own process, with a generous timeout and a bound
on that process's peak memory, and must end as a template error naming its line."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RSS_LIMIT_MB = 600  # an interpreter with numpy, PIL and Jinja is ~100 MB; each attack alone asks for gigabytes
TIMEOUT_S = 180  # generous: the budget ends each attack in about a second here

HEAD = "{#- declare\nkind: probe\nimages: 0\nmodel_card: false\n-#}\n"  # 5 lines: the body starts on line 6
DOUBLE = '{% set ns = namespace(s="ab") %}{% for i in range(60) %}{% set ns.s = STEP %}{% endfor %}'
ATTACKS = {
    "nested loops": ('{% turn "user" %}{% for i in range(99999) %}{% for j in range(99999) %}x{% endfor %}{% endfor %}{% endturn %}',
                     "steps"),
    "replace grows": (DOUBLE.replace("STEP", 'ns.s.replace("a", "aa")'), "replace would build a text"),
    "replace filter grows": (DOUBLE.replace("STEP", 'ns.s | replace("a", "aa")'), "replace would build a text"),
    "center width": ('{% turn "user" %}{{ "x".center(10**9) }}{% endturn %}', "center was given 1,000,000,000"),
    "center filter grows": (DOUBLE.replace("STEP", "ns.s | center(ns.s | length * 2)"), "1,000,000"),
    "ljust grows": (DOUBLE.replace("STEP", 'ns.s.ljust(ns.s | length * 2, "y")'), "1,000,000"),
    "percent width": ('{% turn "user" %}{{ "%1000000000s" % "x" }}{% endturn %}', "asks for a field of 1000000000 characters"),
    "percent grows": (DOUBLE.replace("STEP", '"%s%s" % (ns.s, ns.s)'), "1,000,000"),
    "format width": ('{% turn "user" %}{{ "{:>1000000000}".format("x") }}{% endturn %}', "asks for a field of 1000000000 characters"),
    "format grows": (DOUBLE.replace("STEP", '"{}{}".format(ns.s, ns.s)'), "format built a text of"),
    "format nested width": ('{% turn "user" %}{{ "{:>{}}".format("x", 1000000000) }}{% endturn %}', "format was given 1,000,000,000"),
    "format filter grows": (DOUBLE.replace("STEP", '"%s%s" | format(ns.s, ns.s)'), "1,000,000"),
    "format_each width": ('{% turn "user" %}{{ [{"a": "x"}] | format_each("{a:>1000000000}") | join }}{% endturn %}',
                          "asks for a field of 1000000000 characters"),
    "format_each grows": ('{% set ns = namespace(l=[{"a": "ab"}]) %}{% for i in range(60) %}'
                          '{% set ns.l = [{"a": (ns.l | format_each("{a}{a}"))[0]}] %}{% endfor %}',
                          "1,000,000"),
    "concatenation grows": (DOUBLE.replace("STEP", "ns.s ~ ns.s"), "limit is 1,000,000"),
    "plus grows": (DOUBLE.replace("STEP", "ns.s + ns.s"), "limit is 1,000,000"),
    "join grows": (DOUBLE.replace("STEP", "[ns.s, ns.s] | join"), "limit is 1,000,000"),
    "output in a loop": ('{% set big = "x" * 99999 %}{% turn "user" %}{% for i in range(99999) %}{{ big }}{% endfor %}{% endturn %}',
                         "characters of output"),
    "recursion in width": ('{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}'
                           '{% turn "user" %}{{ f(40) }}{% endturn %}', "steps"),
}

# The child's own peak: VmHWM of its address space (ru_maxrss would count the parent's pages,
# which a forked child holds until it execs).
PEAK = textwrap.dedent('''
    import re, resource
    def peak_mb():
        try:
            return int(re.search(r"VmHWM:\\s*(\\d+)", open("/proc/self/status").read()).group(1)) / 1024
        except (OSError, AttributeError):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
''')

SCRIPT = PEAK + textwrap.dedent('''
    import json, resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # a runaway fails here, not on the machine
    from pathlib import Path
    from curation.findings import Findings
    from curation.items import StudyItem
    from curation.manifest import BuildSpec, TaskSpec
    from curation.render.renderer import Renderer, TemplateError
    folder = Path(sys.argv[1])
    spec = BuildSpec.model_validate({"name": "t", "sources": [{"name": "ct", "kind": "dicom", "root": str(folder)}],
                                     "experts": [{"name": "E", "runner": "labels"}]})
    item = StudyItem(item_id="item-7", patient_key="p", study_key="s", source="ct", kind="dicom", modality="CT",
                     shape=[4, 4, 4], spacing=[1.0, 1.0, 1.0], n_files=1, uris=["a.dcm"])
    try:
        Renderer(spec, prompt_dirs=[folder]).render(TaskSpec(template="probe.j2", source="ct", expert="E"),
                                                     item, Findings(expert="E", runner="labels"), variant=0)
        result = {"error": None}
    except TemplateError as e:
        result = {"error": str(e), "line": e.line}
    result["peak_mb"] = peak_mb()
    print(json.dumps(result))
''')


def run_bounded(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a child with a timeout (and an address-space limit set by the child itself)."""
    return subprocess.run(args, capture_output=True, text=True, cwd=cwd, timeout=TIMEOUT_S,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_a_hostile_template_ends_as_a_template_error_in_bounded_memory(tmp_path: Path, name: str) -> None:
    body, message = ATTACKS[name]
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "probe.j2").write_text(HEAD + body + '{% turn "user" %}a{% endturn %}{% turn "assistant" %}ok{% endturn %}')
    done = run_bounded([sys.executable, "-c", SCRIPT, str(folder)], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["error"] is not None and message in result["error"], result
    assert result["error"].startswith("item-7: template probe.j2, line 6: ") and result["line"] == 6
    assert result["peak_mb"] < RSS_LIMIT_MB, f"{name}: peak memory {result['peak_mb']:.0f} MB"


@pytest.mark.slow
def test_a_hostile_macro_file_ends_as_a_template_error_in_bounded_memory(tmp_path: Path) -> None:
    """A macro file sees the helpers as globals (`make_environment`), and runs under the same
    budget as the template that imports it."""
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "lib.j2").write_text('{% macro grow() %}\n{% set ns = namespace(s=pick(["ab"])) %}{% for i in range(60) %}'
                                   '{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}\n{% endmacro %}\n')
    (folder / "probe.j2").write_text(HEAD + '{% import "lib.j2" as lib %}{% turn "user" %}{{ lib.grow() }}{% endturn %}'
                                     '{% turn "assistant" %}ok{% endturn %}')
    done = run_bounded([sys.executable, "-c", SCRIPT, str(folder)], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["error"] is not None and "limit is 1,000,000" in result["error"], result
    assert result["error"].startswith("item-7: template lib.j2, line 2: ") and "(called from probe.j2, line 6)" in result["error"]
    assert result["peak_mb"] < RSS_LIMIT_MB


@pytest.mark.slow
def test_a_hostile_template_through_preview_is_a_failing_sample(render_demo, tmp_path: Path) -> None:
    """The command line: `preview --template` of a template whose loops never end shows the
    error on its sample, and the command says a sample failed (exit status 1) instead of hanging."""
    import yaml

    manifest = tmp_path / "m.yaml"
    data = json.loads(render_demo.spec.model_dump_json())
    # the render demo names a BRATS bundle it never loads; a command's preflight refuses a missing one
    data["experts"] = [e for e in data["experts"] if e["name"] != "BRATS"]
    data["tasks"] = [t for t in data["tasks"] if t.get("expert") != "BRATS"]
    manifest.write_text(yaml.safe_dump(data))
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "hang.j2").write_text(
        "{#- declare\nkind: probe\nmodality: [CT]\nneeds: [key_slice]\ncalls_expert: false\nmodel_card: false\nimages: 1\n-#}\n"
        '{% turn "user" %}{{ image("key_slice") }}{% for i in range(99999) %}{% for j in range(99999) %}x{% endfor %}{% endfor %}'
        '{% endturn %}{% turn "assistant" %}ok{% endturn %}')
    page = tmp_path / "p.html"
    preview = PEAK + ("import resource, sys\nresource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))\nfrom curation.cli import main\n"
                      "code = main(sys.argv[1:])\nprint('peak_mb', peak_mb())\nsys.exit(code)\n")
    done = run_bounded([sys.executable, "-c", preview, "-q", "preview", str(manifest), "--template", str(folder / "hang.j2"),
                        "-n", "1", "--html", str(page), "--out", str(tmp_path / "out")], tmp_path)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "1 error(s)" in done.stdout and "template hang.j2, line 9: the template ran more than 1,000,000 steps" in page.read_text()
    assert float(done.stdout.split("peak_mb")[1]) < RSS_LIMIT_MB
