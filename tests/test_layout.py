"""`platform/` is a source root, never a package: the stdlib `platform` must survive our imports."""

import subprocess
import sys

from conftest import ROOT


def test_no_platform_package():
    assert not (ROOT / "platform" / "__init__.py").exists()


def test_import_keeps_stdlib_platform_as_on_a_ray_worker():
    # Ray's working_dir puts the repo root first on sys.path; mimic that exactly.
    code = ("import tokray, models, platform, sysconfig; "
            "assert platform.__file__.startswith(sysconfig.get_paths()['stdlib']), platform.__file__; "
            "assert platform.system(); import ray; print('ok', platform.system())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": f"{ROOT}:{ROOT / 'platform'}", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")
