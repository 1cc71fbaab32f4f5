"""Processes that read bundle configs or set up experts import MONAI without the optional
packages it would load for parts no runner uses (`expert_runners.monai_import`), and those
packages stay importable afterwards. Each check runs in a fresh process, as a build's driver
and its expert hosts do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from expert_runners.monai_import import LEFT_OUT

REPO = Path(__file__).resolve().parents[1]


def probe(script: str) -> list[str]:
    """Run `script` in a fresh interpreter; the last line it prints, split on commas."""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()[-1].split(",")


LOADED = f"print(','.join(m for m in ('monai', *{sorted(LEFT_OUT)!r}) if m in sys.modules))\n"


@pytest.mark.slow
def test_describing_and_setting_up_every_builtin_expert_leaves_the_optional_packages_out(tmp_path: Path) -> None:
    """The demo manifest's experts (two MONAI bundles, a CXR ensemble) described as the
    driver does and set up as a host does, and a CXR member that is a MONAI DenseNet."""
    from monai.networks.nets import DenseNet121

    torch.save(DenseNet121(spatial_dims=2, in_channels=1, out_channels=18).state_dict(), tmp_path / "densenet.pt")
    script = (
        "import sys\n"
        "from curation.manifest import ExpertSpec, load_manifest\n"
        "from expert_runners.base import describe_experts, make_runner, manifest_runners\n"
        "spec = load_manifest('manifests/demo.yaml')\n"
        "describe_experts(spec)\n"
        "for runner in manifest_runners(spec).values():\n"
        "    runner.setup('cpu')\n"
        f"cxr = ExpertSpec(name='CXR', runner='cxr_ensemble', bundle={str(tmp_path)!r},\n"
        "                 models=[{'path': 'densenet.pt', 'kind': 'monai_densenet', 'size': 64}])\n"
        "make_runner(cxr).setup('cpu')\n"
        + LOADED
    )
    assert probe(script) == ["monai"]


def test_the_left_out_packages_import_as_usual_afterwards() -> None:
    script = (
        "import sys\n"
        "from expert_runners.monai_import import LEFT_OUT, import_monai\n"
        "monai = import_monai()\n"
        "from monai.networks.nets import SegResNet\n"
        "assert import_monai() is monai and not any(name in sys.modules for name in LEFT_OUT)\n"
        "import scipy.signal\n"  # transformers takes 2 s to import; one is proof enough
        + LOADED
    )
    assert probe(script) == ["monai", "scipy.signal"]
