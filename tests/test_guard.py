"""The folders sparseferry reads and writes: --force never destroys, hostile source folders are refused,
absurd configs fail fast, and every bad input or interruption ends in one line, never a traceback."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import file_size_limit, make_tiny_model

import sparseferry
from sparseferry.cli import main
from sparseferry.convert import convert
from sparseferry.errors import SparseferryError
from sparseferry.guard import ConfigLimitError, FolderError
from sparseferry.store import open_checkpoint
from sparseferry.synth import synth


@pytest.fixture
def src(tmp_path):
    return make_tiny_model("llama", tmp_path / "models", dtype=torch.float32).folder


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- --force


def test_force_onto_the_source_is_refused_and_the_source_survives(src, capsys):
    before = snapshot(src)
    assert main(["convert", str(src), str(src), "--force", "-q"]) == 1
    assert "is the source folder; --force would delete the source" in capsys.readouterr().err
    assert snapshot(src) == before


def test_force_onto_a_folder_containing_the_source_is_refused(src):
    with pytest.raises(FolderError, match="a folder containing the source"):
        convert(src, src.parent, force=True, progress=False)
    assert (src / "config.json").is_file()


def test_force_onto_a_folder_of_other_files_is_refused_and_they_survive(src, tmp_path, capsys):
    other = tmp_path / "thesis"
    other.mkdir()
    (other / "thesis.txt").write_text("four years of work")
    assert main(["convert", str(src), str(other), "--force", "-q"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds thesis.txt, not a sparseferry output" in err
    assert (other / "thesis.txt").read_text() == "four years of work"


def test_force_replaces_an_empty_folder_or_a_previous_output(src, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    convert(src, empty, force=True, progress=False)
    open_checkpoint(empty)
    convert(src, empty, force=True, values="int8", progress=False)  # a previous checkpoint: replaced
    assert open_checkpoint(empty).manifest.get("values", {}).get("format") == "int8"


def test_temporaries_of_dead_runs_are_removed_by_the_next_run(src, tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    dst = tmp_path / "ck"
    stale = [tmp_path / f".ck.partial-{dead.pid}", tmp_path / f".ck.old-{dead.pid}"]
    for s in stale:
        (s / "layers").mkdir(parents=True)
        (s / "layers" / "layer-00000.safetensors").write_bytes(b"\0" * 4096)
    live = tmp_path / f".ck.partial-{os.getppid()}"  # a live process's temporary is left alone
    live.mkdir()
    convert(src, dst, progress=False)
    assert not any(s.exists() for s in stale) and live.exists()
    assert f"removed {stale[0]}" in caplog.text


# -- source folders


def test_a_fifo_named_like_weights_is_refused_without_blocking(src, tmp_path):
    (src / "model.safetensors").rename(src / "real.bin.keep")
    os.mkfifo(src / "model.safetensors")
    out = subprocess.run([sys.executable, "-m", "sparseferry.cli", "convert", str(src), str(tmp_path / "ck"), "-q"],
                         capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert out.returncode == 1 and "model.safetensors: is a FIFO; expected a regular file" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_side_file_linking_out_of_the_source_is_refused(src, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the checkpoint")
    (src / "notes.txt").symlink_to(secret)
    with pytest.raises(FolderError, match=r"notes.txt: a link to .*secret.txt, outside the source folder"):
        convert(src, tmp_path / "ck", progress=False)
    assert not (tmp_path / "ck").exists()


def test_links_inside_the_source_and_into_a_hub_cache_blob_store_are_fine(tmp_path):
    folder, _ = make_tiny_model("llama", tmp_path / "hub" / "models--x--y" / "snapshots", name="abc123", dtype=torch.float32)
    blobs = folder.parent.parent / "blobs"
    blobs.mkdir()
    for f in ("model.safetensors", "config.json"):
        (folder / f).rename(blobs / f"sha-{f}")
        (folder / f).symlink_to(Path("../../blobs") / f"sha-{f}")
    (folder / "README.md").write_text("x")
    (folder / "readme-link.md").symlink_to("README.md")
    convert(folder, tmp_path / "ck", progress=False)
    assert (tmp_path / "ck" / "readme-link.md").read_text() == "x"


def test_absurd_config_values_fail_fast(src, tmp_path):
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = 10_000_000
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigLimitError, match=r"num_hidden_layers = 10000000, expected an integer in \[0, 4096\]"):
        convert(src, tmp_path / "ck", progress=False)


def test_non_finite_floats_in_config_convert_and_load(src, tmp_path):
    cfg = json.loads((src / "config.json").read_text())
    cfg["time_step_limit"] = [0.0, {"__float__": "Infinity"}]  # as transformers writes it (Mamba2, Falcon-H1)
    (src / "config.json").write_text(json.dumps(cfg))
    convert(src, tmp_path / "ck", progress=False)
    written = json.loads((tmp_path / "ck" / "config.json").read_text())  # standard JSON, same encoding
    assert written["time_step_limit"] == [0.0, {"__float__": "Infinity"}]
    model = sparseferry.load(tmp_path / "ck")
    try:
        assert model.config.time_step_limit[1] == float("inf")
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3]]))
    finally:
        model.sparseferry.close()


# -- interruptions and the environment


def test_synth_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, capsys):
    out = tmp_path / "syn"
    with file_size_limit(200_000):
        rc = main(["synth", str(out), "--params", "1.5M", "--vocab", "512", "-q"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "nothing was written" in err, err
    assert not out.exists() and not list(tmp_path.glob(".syn.*"))


def test_synth_force_never_replaces_a_foreign_folder(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "data.csv").write_text("1,2")
    with pytest.raises(SparseferryError, match="not a sparseferry output"):
        synth(out, params="1.5M", vocab=512, force=True, progress=False)
    assert (out / "data.csv").exists()


def test_ctrl_c_after_the_one_line_error_adds_nothing(tmp_path):
    """Once the command has printed its outcome, only the interpreter's shutdown is left (atexit
    callbacks, torch's finalizers): a Ctrl-C there is ignored, not a traceback after the line."""
    exe = Path(sys.executable).parent / "sparseferry"
    if not exe.exists():
        pytest.skip("console script not installed")
    for delay in (0.0, 0.005, 0.01, 0.02, 0.03, 0.05):
        proc = subprocess.Popen([str(exe), "inspect", str(tmp_path / "nothing")], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        line = proc.stderr.readline()
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        err = line + proc.stderr.read()
        proc.wait(timeout=60)
        assert err.startswith("sparseferry: error:") and err.count("\n") == 1, (delay, err)
        assert proc.returncode == 1, (delay, proc.returncode, err)


@pytest.mark.parametrize("delay", [0.5, 1.0, 2.0])
def test_ctrl_c_in_the_first_moments_of_a_command_is_one_line(tmp_path, delay):
    """While torch and transformers import (seconds). The interpreter's own start-up before any
    program code runs (site, ~0.05 s) is out of reach of every Python program."""
    exe = Path(sys.executable).parent / "sparseferry"
    if not exe.exists():
        pytest.skip("console script not installed")
    proc = subprocess.Popen([str(exe), "inspect", str(tmp_path / "nothing")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err, err
    done = err.startswith("sparseferry: error:") and err.count("\n") == 1  # its one-line error came first
    # interrupted (130); or already done with its one-line error (1), the signal maybe landing in the
    # interpreter's own shutdown after it (-SIGINT: no program code is left to run there)
    assert proc.returncode == 130 or (done and proc.returncode in (1, -signal.SIGINT)), (proc.returncode, err)
    assert err.count("\n") <= 1
