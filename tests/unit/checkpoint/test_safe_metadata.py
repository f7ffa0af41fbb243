"""Checkpoints that cannot run code: crafted pickles on every path that opens a checkpoint.

Each attack runs in a subprocess whose payload would create a marker file; the test asserts the
load was refused and the marker does not exist. Every attack has a negative control: the same
file through plain ``pickle.load`` / ``torch.load`` does create the marker, so the payload is live.
"""

import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


def _s(text: str) -> bytes:
    b = text.encode()
    return b"\x8c" + bytes([len(b)]) + b  # SHORT_BINUNICODE


def dotted_payload(marker: Path) -> bytes:
    """Protocol 4: ``STACK_GLOBAL('torch.distributed.checkpoint.filesystem', 'os.system')`` -- an
    allowed module, a dotted name that pickle resolves through attributes to ``os.system``."""
    return (b"\x80\x04" + _s("torch.distributed.checkpoint.filesystem") + _s("os.system") + b"\x93"
            + _s(f"touch {marker}") + b"\x85R.")


class _Eval:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return eval, (f"open({self.marker!r}, 'w').close()",)


def eval_payload(marker: Path) -> bytes:
    return pickle.dumps(_Eval(marker), protocol=2)


def run_py(code: str, cwd: Path, **env) -> subprocess.CompletedProcess:
    e = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=e, capture_output=True,
                          text=True, timeout=120)


def fake_checkpoint(root: Path, metadata: bytes) -> Path:
    it = root / "iter_0000005"
    it.mkdir(parents=True)
    (root / "latest_checkpointed_iteration.txt").write_text("5\n")
    (it / ".metadata").write_bytes(metadata)
    (it / "metadata.json").write_text('{"sharded_backend": "torch_dist", "sharded_backend_version": 1, '
                                      '"common_backend": "torch", "common_backend_version": 1}')
    return it


OPENERS = {
    "--load": "from megatron_pack.checkpoint.dist import load_checkpoint as f; f(ROOT, None, None, None)",
    "--pretrained-checkpoint": "from megatron_pack.checkpoint.dist_reader import load_model_from_dist_checkpoint "
                               "as f; f(ROOT, None)",
    "megatron-to-hf": "from megatron_pack.convert.megatron_to_hf import DistSource; DistSource(ITER)",
}


@pytest.mark.parametrize("payload", [eval_payload, dotted_payload])
@pytest.mark.parametrize("opener", sorted(OPENERS))
def test_malicious_metadata_refused_and_nothing_runs(tmp_path, payload, opener):
    marker = tmp_path / "PWNED"
    it = fake_checkpoint(tmp_path / "ck", payload(marker))
    code = f"ROOT, ITER = {str(tmp_path / 'ck')!r}, {str(it)!r}\n" + OPENERS[opener]
    r = run_py(code, tmp_path)
    assert r.returncode != 0
    assert "CheckpointError" in r.stderr and "refusing to load it" in r.stderr, r.stderr[-2000:]
    assert ".metadata" in r.stderr  # names the file
    assert not marker.exists(), f"{opener}: the payload ran"


@pytest.mark.parametrize("payload", [eval_payload, dotted_payload])
def test_negative_control_payloads_are_live(tmp_path, payload):
    marker = tmp_path / "PWNED"
    (tmp_path / "m.pkl").write_bytes(payload(marker))
    r = run_py("import pickle, torch.distributed.checkpoint.filesystem; pickle.load(open('m.pkl', 'rb'))", tmp_path)
    assert r.returncode == 0, r.stderr
    assert marker.exists()


def test_genuine_metadata_reads_and_loads(tmp_path):
    import torch
    import torch.distributed.checkpoint as dcp

    from megatron_pack.checkpoint.safe_metadata import read_dist_metadata, safe_reader

    src = {"w": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3), "x": torch.ones(4)}
    with pytest.warns(UserWarning):
        dcp.save(src, storage_writer=dcp.FileSystemWriter(str(tmp_path)), no_dist=True)
    md = read_dist_metadata(str(tmp_path))
    assert set(md.state_dict_metadata) == {"w", "x"}
    out = {"w": torch.zeros(2, 3, dtype=torch.bfloat16), "x": torch.zeros(4)}
    dcp.load(out, storage_reader=safe_reader(str(tmp_path), md), no_dist=True)
    assert torch.equal(out["w"], src["w"]) and torch.equal(out["x"], src["x"])


def _malicious_torch_file(path: Path, marker: Path):
    import torch

    torch.save({"iteration": 3, "x": _Eval(marker)}, str(path))


def test_common_pt_and_rng_refused_even_with_force_no_weights_only(tmp_path):
    """``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` turns torch.load's default off; ours is explicit."""
    marker = tmp_path / "PWNED"
    _malicious_torch_file(tmp_path / "common.pt", marker)
    code = """
        import warnings, torch, torch.distributed.checkpoint as dcp
        from megatron_pack.checkpoint.safe_metadata import safe_load_strategies, safe_torch_load
        from megatron_pack.checkpoint.iterations import CheckpointError
        warnings.simplefilter('ignore')
        dcp.save({'w': torch.zeros(2)}, storage_writer=dcp.FileSystemWriter('.'), no_dist=True)
        for load in (lambda: safe_torch_load('common.pt'),  # RNG files, our own reads
                     lambda: safe_load_strategies('.')[1].load_common('.')):  # Megatron's common.pt read
            try:
                load()
            except CheckpointError as e:
                print('REFUSED', e)
    """
    r = run_py(code, tmp_path, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")
    assert r.stdout.count("REFUSED") == 2 and "common.pt" in r.stdout, r.stdout + r.stderr
    assert not marker.exists()
    # negative control: Megatron-Core's own call (torch.load without weights_only) runs it
    r = run_py("import torch; torch.load('common.pt', map_location='cpu')", tmp_path,
               TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1")
    assert marker.exists(), r.stderr


def test_byte_items_loaded_weights_only(tmp_path):
    """DCP's default planner unpickles byte items with weights_only=False; ours does not."""
    marker = tmp_path / "PWNED"
    code = f"""
        import io, warnings, torch, torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import DefaultLoadPlanner
        from megatron_pack.checkpoint.safe_metadata import SafeBytesMixin, safe_reader
        warnings.simplefilter('ignore')
        class Evil:
            def __reduce__(self):
                return eval, ("open({str(marker)!r}, 'w').close()",)
        dcp.save({{'b': Evil()}}, storage_writer=dcp.FileSystemWriter('ck'), no_dist=True)
        class P(SafeBytesMixin, DefaultLoadPlanner):
            pass
        try:
            dcp.load({{'b': None}}, storage_reader=safe_reader('ck'), planner=P(), no_dist=True)
        except BaseException as e:  # DCP wraps it in CheckpointException (a BaseException)
            print('REFUSED', type(e).__name__)
    """
    r = run_py(code, tmp_path)
    assert "REFUSED" in r.stdout, r.stdout + r.stderr
    assert not marker.exists()
    r = run_py("import torch.distributed.checkpoint as dcp, warnings; warnings.simplefilter('ignore');"
               "dcp.load({'b': None}, storage_reader=dcp.FileSystemReader('ck'), no_dist=True)", tmp_path)
    assert marker.exists(), r.stderr  # negative control: DCP's default planner runs it
