"""Run timm's own model test suite (`tests/test_models.py` of the installed timm's source distribution) on
the FlexPredict models, with `flexpredict_vit_*` treated as timm treats its own `vit_*` (a NON_STD_FILTERS entry).

    python tests/run_timm_model_tests.py                      # pip-downloads the sdist of the installed timm
    python tests/run_timm_model_tests.py --sdist timm-1.0.31.tar.gz -x -q   # a .tar.gz or an extracted folder;
                                                                            # other arguments go to pytest

Nothing of timm is stored in this repository: the test file is copied into a temporary folder, patched there,
and run with `-k flexpredict`. The exit code is pytest's. Not collected by our own pytest run (no `test_` prefix).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import List, Optional

MODEL_FILTER = "flexpredict_vit_*"
TIMM_TEST_FILES = ("tests/test_models.py", "tests/conftest.py")
NON_STD_ANCHOR = "NON_STD_FILTERS = [\n"

# Loaded before timm's test module, so its module-level list_models() calls see the FlexPredict models.
PLUGIN_CONFTEST = '''\
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # released weights come from the local cache or not at all

import pytest
import flexpredict_zoo  # noqa: F401  (registers flexpredict_vit_* with timm)

PRETRAINED_TESTS = ("test_model_load_pretrained", "test_model_features_pretrained")


def _needs_download(model_name):
    """Why the weights of this pretrained cfg are not on this machine (None when they are)."""
    from huggingface_hub import try_to_load_from_cache
    from timm.models import get_pretrained_cfg
    from flexpredict_zoo.hub import split_revision

    cfg = get_pretrained_cfg(model_name)
    if cfg is None or cfg.file or not (cfg.hf_hub_id and cfg.hf_hub_filename):
        return None
    repo_id, revision = split_revision(cfg.hf_hub_id)
    if isinstance(try_to_load_from_cache(repo_id, cfg.hf_hub_filename, revision=revision), str):
        return None
    return f"needs a download: {cfg.hf_hub_filename} of {repo_id} is not in the local Hugging Face cache"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.originalname in PRETRAINED_TESTS and "flexpredict" in item.callspec.params["model_name"]:
            reason = _needs_download(item.callspec.params["model_name"])
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
'''

PYTEST_INI = """\
[pytest]
markers =
    base
    forward
    backward
    cfg
    cfg_nonstd
    torchscript
    features
    fxforward
    fxbackward
    timeout(seconds): pytest-timeout's marker, inert when that plugin is not installed
"""


def download_sdist(version: str, dest: Path) -> Path:
    """The timm sdist of `version`, fetched with pip into `dest`."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", f"timm=={version}",
           "-d", str(dest), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob(f"timm-{version}.tar.gz"))
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"could not download the timm {version} source distribution ({' '.join(cmd)}):\n"
                           f"{proc.stderr.strip()}\nPass one with --sdist PATH (a .tar.gz or an extracted folder).")
    return found[0]


def copy_timm_tests(sdist: Path, dest: Path) -> None:
    """Copy timm's model test file and its conftest from an sdist (.tar.gz or extracted folder) into dest/tests."""
    (dest / "tests").mkdir(parents=True)
    if sdist.is_dir():
        roots = [sdist] + sorted(p for p in sdist.iterdir() if p.is_dir())  # the folder itself, or its timm-X/ child
        root = next((r for r in roots if (r / TIMM_TEST_FILES[0]).is_file()), None)
        if root is None:
            raise FileNotFoundError(f"{sdist} holds no {TIMM_TEST_FILES[0]}: pass timm's extracted source distribution")
        for name in TIMM_TEST_FILES:
            (dest / name).write_bytes((root / name).read_bytes())
        return
    with tarfile.open(sdist) as tar:
        members = {m.name.split("/", 1)[-1]: m for m in tar.getmembers() if m.isfile()}
        missing = [name for name in TIMM_TEST_FILES if name not in members]
        if missing:
            raise FileNotFoundError(f"{sdist} holds no {missing}: pass timm's source distribution")
        for name in TIMM_TEST_FILES:
            (dest / name).write_bytes(tar.extractfile(members[name]).read())


def add_non_std_filter(test_file: Path, pattern: str = MODEL_FILTER) -> None:
    """Add `pattern` to NON_STD_FILTERS in the copied test file, where timm lists its own 'vit_*'."""
    text = test_file.read_text()
    if text.count(NON_STD_ANCHOR) != 1:
        raise RuntimeError(f"{test_file}: cannot find the NON_STD_FILTERS list to add {pattern!r} to; "
                           f"this timm version's test file has another layout")
    test_file.write_text(text.replace(NON_STD_ANCHOR, f"{NON_STD_ANCHOR}    {pattern!r},\n"))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Other arguments are passed to pytest.")
    parser.add_argument("--sdist", type=Path, help="timm source distribution: .tar.gz or extracted folder "
                                                   "(default: pip download the installed timm version)")
    args, pytest_args = parser.parse_known_args(argv)
    import timm

    with tempfile.TemporaryDirectory(prefix="timm-model-tests-") as tmp:
        work = Path(tmp)
        sdist = args.sdist.expanduser().resolve() if args.sdist else download_sdist(timm.__version__, work / "sdist")
        run_dir = work / "run"
        copy_timm_tests(sdist, run_dir)
        add_non_std_filter(run_dir / "tests" / "test_models.py")
        (run_dir / "conftest.py").write_text(PLUGIN_CONFTEST)
        (run_dir / "pytest.ini").write_text(PYTEST_INI)
        print(f"timm {timm.__version__} tests from {sdist}, on {MODEL_FILTER}", flush=True)
        cmd = [sys.executable, "-m", "pytest", "tests/test_models.py", "-k", "flexpredict", "-p", "no:cacheprovider",
               "-rfEs", *pytest_args]
        return subprocess.run(cmd, cwd=run_dir).returncode


if __name__ == "__main__":
    sys.exit(main())
