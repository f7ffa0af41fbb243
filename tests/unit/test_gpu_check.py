"""scripts/gpu_check.sh on a simulated bare, offline machine, and scripts/gather_gpu_bundle.sh's
pieces, without a GPU and without the network (CI runs this).

The bare machine: no index reachable (PIP_INDEX_URL at a closed localhost port, PIP_NO_INDEX,
proxies at a closed port), a bundle holding only a tiny locally-built wheel standing in for a
missing package, a fresh install target. The script must install that wheel from the bundle, name
what it skipped, write the "no GPU: skipped" report in at most 8 files and exit 0. The benchmark
code itself runs as a script (``--allow-cpu``, toy sizes), never imported from ``benchmarks/``.
"""

import json
import os
import subprocess
import sys
import tarfile
import time
import zipfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLOSED = "http://127.0.0.1:9"  # the discard port: nothing listens there


def _env(**extra):
    return {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, **extra}


def offline_env(**extra):
    return _env(PIP_INDEX_URL=f"{CLOSED}/simple", PIP_EXTRA_INDEX_URL="", PIP_FIND_LINKS="", PIP_NO_INDEX="1",
                PIP_RETRIES="0", PIP_TIMEOUT="2", http_proxy=CLOSED, https_proxy=CLOSED, HTTP_PROXY=CLOSED,
                HTTPS_PROXY=CLOSED, **extra)


def tiny_wheel(folder, name="mp_standin", version="0.1") -> str:
    """A minimal pure-Python wheel (one module) standing in for a package the machine lacks."""
    path = os.path.join(folder, f"{name}-{version}-py3-none-any.whl")
    info = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": f"__version__ = '{version}'\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as z:
        for f, text in files.items():
            z.writestr(f, text)
    return path


def make_bundle(tmp_path) -> str:
    bundle = tmp_path / "bundle"
    (bundle / "wheels").mkdir(parents=True)
    whl = os.path.basename(tiny_wheel(str(bundle / "wheels")))
    numpy_whl = os.path.basename(tiny_wheel(str(bundle / "wheels"), "numpy", "0.0.1"))
    # the stand-in is missing here; numpy is importable, so its (fake) wheel must be left alone
    (bundle / "wheels.txt").write_text(f"{whl} mp_standin -\n{numpy_whl} numpy 1.0\n")
    return str(bundle)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the script runs the real check")
def test_script_on_a_bare_offline_machine_installs_from_the_bundle_and_reports_no_gpu(tmp_path):
    site, out_dir = tmp_path / "site", tmp_path / "out"
    env = offline_env(GPU_BUNDLE=make_bundle(tmp_path), GPU_CHECK_SITE=str(site), GPU_CHECK_OUT=str(out_dir))
    t0 = time.monotonic()
    res = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log
    assert time.monotonic() - t0 < 120, "an offline install must not wait on the network"
    # the install step: the missing module from the bundle into the fresh target, nothing else
    assert (site / "mp_standin" / "__init__.py").exists(), log
    assert not (site / "numpy").exists()
    assert "install: mp_standin-0.1-py3-none-any.whl from the bundle into" in log
    assert "install: numpy already importable here" in log
    assert "install: _packing already built for this Python" in log
    # the skip notes, and the no-GPU report
    for extra in ("Transformer Engine not installed", "flash-attn not installed", "trl/datasets not installed"):
        assert f"skipped: {extra}" in log, log
    assert "no GPU: skipped" in log
    files = sorted(os.listdir(out_dir))
    assert files == ["gpu_check.json", "gpu_check.md", "logs.tar.gz"], files
    assert len(files) <= 8 and all(os.path.isfile(out_dir / f) for f in files)
    md = (out_dir / "gpu_check.md").read_text()
    assert md.startswith("# GPU check") and "**no GPU: skipped**" in md
    assert "- install: mp_standin-0.1-py3-none-any.whl from the bundle" in md
    report = json.loads((out_dir / "gpu_check.json").read_text())
    assert report["no_gpu"] and report["tests"] == {"ran": False, "why": "no GPU"}
    assert "attention" not in report and "model_steps" not in report
    assert any("no GPU" in s for s in report["skipped"])
    assert any(s.startswith("skipped: flash-attn") for s in report["skipped"])
    with tarfile.open(out_dir / "logs.tar.gz") as t:
        names = t.getnames()
    assert "./install_mp_standin.log" in names and "./notes.txt" in names, names


def test_benchmark_code_runs_on_cpu(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
                   '<testcase classname="tests.gpu.t" name="ok"/>'
                   '<testcase classname="tests.gpu.t" name="bad"><failure message="boom"/></testcase>'
                   '<testcase classname="tests.gpu.t" name="skip"><skipped message="needs TE"/></testcase>'
                   '</testsuite></testsuites>')
    out = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--allow-cpu", "--out-dir", str(tmp_path),
                          "--modes", "padding,bfd", "--steps", "2", "--tests-xml", str(xml)], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]  # the failing test in the XML
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    t = report["tests"]
    assert (t["passed"], t["failures"], t["skipped"]) == (1, 1, 1)
    assert t["failed"] == ["tests.gpu.t::bad"] and t["skip_reasons"] == ["tests.gpu.t::skip: needs TE"]
    rows = {r["kernel"]: r for r in report["attention"]["rows"]}
    assert rows["torch"]["max_abs_diff"] < 1e-5  # THD = padded on the real tokens
    assert rows["torch"]["padded_ms"] > 0 and rows["torch"]["thd_ms"] > 0
    assert all(rows[k]["skipped"] == "no CUDA" for k in ("varlen", "flex", "flash", "te"))
    assert 0.35 < report["attention"]["padding_fraction"] < 0.55
    steps = {r["mode"]: r for r in report["model_steps"]}
    assert set(steps) == {"padding", "bfd"}
    for r in steps.values():
        assert r["steps"] == 2 and r["real_tokens_per_s"] > 0
        assert r["mfu"] is None  # no GPU peak to divide by
    assert steps["bfd"]["padding_fraction"] < steps["padding"]["padding_fraction"]
    md = (tmp_path / "gpu_check.md").read_text()
    assert "## Attention: packed (THD) vs padded" in md and "## train() steps on one GPU" in md
    assert "attention kernel varlen: no CUDA" in md and "- FAILED tests.gpu.t::bad" in md
    assert "`varlen_attn(" in md  # the signature of this torch's varlen_attn is printed


# --------------------------------------------------------------------------------------------
# scripts/gather_gpu_bundle.sh, piece by piece (no network, no compiler)
# --------------------------------------------------------------------------------------------


def gather(cmd: str, **env):
    return subprocess.run(["bash", "-c", f"source scripts/gather_gpu_bundle.sh && {cmd}"], cwd=ROOT,
                          env=offline_env(**env), capture_output=True, text=True, timeout=120)


def test_gather_assembles_the_bundle_from_local_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    mc = tiny_wheel(str(src), "megatron_core", "0.16.1")
    pk = tiny_wheel(str(src), "packaging", "24.2")
    ext = src / "_packing.cpython-312-x86_64-linux-gnu.so"
    ext.write_bytes(b"\x7fELF stand-in")
    bundle = tmp_path / "bundle"
    res = gather("main", GPU_BUNDLE=str(bundle), MCORE_WHEEL=mc, PACKING_WHEEL="", PACKAGING_WHEEL=pk,
                 PACKING_EXT=str(ext))
    assert res.returncode == 0, res.stdout + res.stderr
    assert (bundle / "wheels.txt").read_text() == ("megatron_core-0.16.1-py3-none-any.whl megatron.core -\n"
                                                   "packaging-24.2-py3-none-any.whl packaging 24.2\n")
    assert (bundle / "ext" / ext.name).exists()
    manifest = (bundle / "MANIFEST.txt").read_text()
    for f in ("wheels/megatron_core-0.16.1-py3-none-any.whl", "wheels/packaging-24.2-py3-none-any.whl",
              f"ext/{ext.name}", "wheels.txt"):
        assert f in manifest, manifest
    assert "in " + str(bundle) in res.stdout  # its size is printed


def test_gather_names_a_missing_python_312(tmp_path):
    res = gather("PATH=/usr/bin:/bin find_py312", PY312=str(tmp_path / "no-python"))
    assert res.returncode != 0
    assert "no CPython 3.12 found (set PY312=" in res.stderr or "Python 3.12" in res.stdout


def test_bundle_folder_is_git_ignored():
    ignored = subprocess.run(["git", "check-ignore", "-q", ".gpu_bundle/wheels/x.whl"], cwd=ROOT)
    assert ignored.returncode == 0
