"""The command line: `sparseferry convert` and `sparseferry inspect`, and how they report bad input.

Bad input ends with exit status 1 and exactly one stderr line, `sparseferry: error: <file/tensor>: ...`,
never a traceback, and never a half-written destination.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import (
    assert_bit_equal,
    assert_nothing_written,
    make_checkpoint,
    make_tiny_model,
)

from sparseferry.validate import seal
from sparseferry.cli import main
from sparseferry.store import MANIFEST, layer_file, open_checkpoint


def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what the fixtures printed
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, *fragments: str) -> None:
    assert rc == 1
    assert "Traceback" not in err
    assert err.startswith("sparseferry: error: ") and err.count("\n") == 1, err
    for f in fragments:
        assert f in err, f"{f!r} not in {err!r}"


# ----------------------------------------------------------------------------------------------
# Happy paths


def test_convert_writes_a_checkpoint_and_reports_sizes(tmp_path, capsys):
    src, model = make_tiny_model("opt", tmp_path)
    rc, out, err = run(capsys, "convert", src, tmp_path / "out", "-q")
    assert rc == 0 and err == ""
    assert out.startswith(f"wrote {tmp_path / 'out'}: ") and "tensors" in out and "GB/s" in out
    ckpt = open_checkpoint(tmp_path / "out")
    for name, t in model.state_dict().items():
        assert_bit_equal(ckpt.load(ckpt.tied.get(name, name)), t, name)


def test_inspect_prints_one_row_per_layer_and_a_total(tmp_path, capsys):
    dst, _ = make_checkpoint("llama", tmp_path)
    rc, out, _ = run(capsys, "inspect", dst)
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].startswith(f"{dst}  (LlamaForCausalLM, format v1, 2 layers)") and "checksums OK" not in lines[0]
    rows = {line.split()[0] if not line.startswith("layer") else " ".join(line.split()[:2]): line.split() for line in lines[2:]}
    assert set(rows) == {"layer 0", "layer 1", "other", "total"}
    assert rows["layer 0"][3:5] == ["7", "0.500"]  # 7 bitmap-encoded matrices, 50% sparse


def test_inspect_json_agrees_with_the_checkpoint(tmp_path, capsys):
    dst, _ = make_checkpoint("gpt2", tmp_path)
    rc, out, _ = run(capsys, "inspect", dst, "--json")
    assert rc == 0
    rep = json.loads(out)
    ckpt = open_checkpoint(dst)
    assert rep["architecture"] == "GPT2LMHeadModel" and rep["num_layers"] == 2 and rep["verified"] is False
    assert [r["group"] for r in rep["layers"]] == ["layer 0", "layer 1", "other"]
    assert rep["total"]["dense_bytes"] == ckpt.dense_bytes() and rep["total"]["stored_bytes"] == ckpt.stored_bytes()
    assert sum(r["stored_bytes"] for r in rep["layers"]) == ckpt.stored_bytes()
    assert rep["layers"][0]["sparsity"] == 0.5 and rep["layers"][0]["encoded"] == 4  # c_attn, c_proj, c_fc, c_proj


def test_inspect_verify_checks_every_checksum(tmp_path, capsys):
    dst, _ = make_checkpoint("llama", tmp_path)
    rc, out, _ = run(capsys, "inspect", dst, "--verify")
    assert rc == 0 and "checksums OK" in out.splitlines()[0]
    rc, out, _ = run(capsys, "inspect", dst, "--verify", "--json")
    assert rc == 0 and json.loads(out)["verified"] is True


def test_force_replaces_an_existing_destination(tmp_path, capsys):
    src, model = make_tiny_model("llama", tmp_path)
    dst = tmp_path / "out"
    dst.mkdir()
    rc, _, err = run(capsys, "convert", src, dst, "-q")
    assert_one_line_error(rc, err, f"{dst}: already exists", "--force")
    rc, _, _ = run(capsys, "convert", src, dst, "-q", "--force")
    assert rc == 0
    assert open_checkpoint(dst).num_layers == 2


# ----------------------------------------------------------------------------------------------
# Bad input: one line, exit 1, nothing written


def test_missing_config(tmp_path, capsys):
    src, _ = make_tiny_model("llama", tmp_path)
    (src / "config.json").unlink()
    rc, _, err = run(capsys, "convert", src, tmp_path / "out", "-q")
    assert_one_line_error(rc, err, f"{src}: no config.json")
    assert_nothing_written(tmp_path / "out")


def test_missing_weights(tmp_path, capsys):
    src, _ = make_tiny_model("llama", tmp_path)
    (src / "model.safetensors").unlink()
    rc, _, err = run(capsys, "convert", src, tmp_path / "out", "-q")
    assert_one_line_error(rc, err, f"{src}: no weights")
    assert_nothing_written(tmp_path / "out")


def test_unsupported_dtype(tmp_path, capsys):
    import torch

    src, _ = make_tiny_model("llama", tmp_path, dtype=torch.float64)
    rc, _, err = run(capsys, "convert", src, tmp_path / "out", "-q")
    assert_one_line_error(rc, err, str(src / "model.safetensors"), "model.layers.0.", "torch.float64", "--dtype")
    assert_nothing_written(tmp_path / "out")
    rc, _, _ = run(capsys, "convert", src, tmp_path / "out", "-q", "--dtype", "bfloat16")
    assert rc == 0


def test_truncated_shard(tmp_path, capsys):
    src, _ = make_tiny_model("llama", tmp_path, max_shard_size="60KB")
    shard = sorted(src.glob("model-*-of-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    rc, _, err = run(capsys, "convert", src, tmp_path / "out", "-q")
    assert_one_line_error(rc, err, str(shard))
    assert_nothing_written(tmp_path / "out")


def test_corrupted_layer_file(tmp_path, capsys):
    dst, _ = make_checkpoint("llama", tmp_path)
    part = open_checkpoint(dst).tensors["model.layers.1.mlp.gate_proj.weight"].parts["bitmask"]
    path = dst / layer_file(1)
    with open(path, "r+b") as f:
        f.seek(part["offset"] + 3)
        f.write(b"\x5a\xa5")
    rc, _, _ = run(capsys, "inspect", dst)  # sizes are unchanged: a plain inspect does not read weights
    assert rc == 0
    rc, _, err = run(capsys, "inspect", dst, "--verify")
    assert_one_line_error(rc, err, str(path), "checksum mismatch", "model.layers.1.mlp.gate_proj.bitmask")


@pytest.mark.parametrize("damage,fragments", [
    ("truncate", ["bytes, manifest says", "(truncated or modified)"]),
    ("delete", ["listed in the manifest but missing"]),
    ("future", ["format version 2 is newer than this sparseferry reads (1); upgrade sparseferry"]),
    ("no-manifest", ["not a sparseferry checkpoint", "run `sparseferry convert`"]),
])
def test_damaged_checkpoint(tmp_path, capsys, damage, fragments):
    dst, _ = make_checkpoint("llama", tmp_path)
    path = dst / layer_file(0)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-1])
    elif damage == "delete":
        path.unlink()
    elif damage == "future":
        m = json.loads((dst / MANIFEST).read_text())
        m["format_version"] = 2
        (dst / MANIFEST).write_text(json.dumps(seal(m)))
    else:
        (dst / MANIFEST).unlink()
    rc, _, err = run(capsys, "inspect", dst, "--verify")
    named = dst / MANIFEST if damage == "future" else dst if damage == "no-manifest" else path
    assert_one_line_error(rc, err, f"{named}: ", *fragments)


def test_a_full_disk_in_a_real_process(tmp_path):
    """The disk fills up mid-write: RLIMIT_FSIZE makes every write past 20 KB fail with EFBIG."""
    src, _ = make_tiny_model("llama", tmp_path)
    dst = tmp_path / "out"
    script = textwrap.dedent(f"""
        import resource, signal, sys
        from sparseferry.cli import main
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))
        sys.exit(main(["convert", {str(src)!r}, {str(dst)!r}]))
    """)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120,
                       cwd=Path(__file__).parent)
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr
    last = p.stderr.strip().splitlines()[-1]  # after the progress bar
    assert last == (f"sparseferry: error: {dst}: out of disk space while writing layers/layer-00000.safetensors "
                    "(File too large); nothing was written")
    assert_nothing_written(dst)
