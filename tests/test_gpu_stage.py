"""bench/gpu_voice/stage.py: chunk / join / checksum on small fake files, wheel slimming, the install step."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from bench.gpu_voice import stage
from bench.gpu_voice.stage import StageError


def _files(tmp: Path) -> list[tuple[str, Path]]:
    rng = __import__("random").Random(7)
    out = []
    for i, n in enumerate((25_000, 1, 0, 41_234)):
        p = tmp / f"src{i}.bin"
        p.write_bytes(bytes(rng.getrandbits(8) for _ in range(n)))
        out.append((f"wheels/f{i}.bin", p))
    return out


def _carry_all(out: Path, m: dict, into: Path) -> None:
    for c in m["chunks"]:
        stage.receive(out / c["folder"], into)


def test_bundle_chunks_round_trip(tmp_path):
    files = _files(tmp_path)
    m = stage.bundle(files, tmp_path / "stage", "demo", chunk_bytes=16_384)
    chunks = m["chunks"]
    assert len(chunks) == -(-m["bundle_bytes"] // 16_384) >= 5
    assert all(c["bytes"] == 16_384 for c in chunks[:-1]) and 0 < chunks[-1]["bytes"] <= 16_384
    assert sum(c["bytes"] for c in chunks) == m["bundle_bytes"]
    for k, c in enumerate(chunks, 1):  # one folder per device call, each with the manifest
        folder = tmp_path / "stage" / f"demo-c{k:02d}"
        assert sorted(os.listdir(folder)) == sorted([c["name"], "manifest.json"])
        assert hashlib.sha256((folder / c["name"]).read_bytes()).hexdigest() == c["sha256"]
    into = tmp_path / "there"
    held = [stage.receive(tmp_path / "stage" / c["folder"], into)[1] for c in chunks]
    assert held == list(range(1, len(chunks) + 1))
    m2, tar = stage.join(into, "demo")
    assert tar.stat().st_size == m["bundle_bytes"] and m2["bundle_sha256"] == m["bundle_sha256"]
    paths = stage.extract(tar, tmp_path / "x", m2)
    for (name, src), p in zip(files, paths, strict=True):
        assert p == tmp_path / "x" / name and p.read_bytes() == src.read_bytes()


def test_corrupted_chunk_is_refused_on_receive(tmp_path):
    m = stage.bundle(_files(tmp_path), tmp_path / "stage", "demo", chunk_bytes=16_384)
    bad = tmp_path / "stage" / m["chunks"][2]["folder"] / m["chunks"][2]["name"]
    data = bytearray(bad.read_bytes())
    data[100] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(StageError, match=r"chunk demo\.tar\.03: sha256"):
        stage.receive(bad.parent, tmp_path / "there")


def test_join_refuses_missing_changed_and_fresh_machine(tmp_path):
    out, into = tmp_path / "stage", tmp_path / "there"
    m = stage.bundle(_files(tmp_path), out, "demo", chunk_bytes=16_384)
    with pytest.raises(StageError, match="machine is fresh"):
        stage.join(into, "demo")
    for c in m["chunks"][:-2]:
        stage.receive(out / c["folder"], into)
    with pytest.raises(StageError, match=r"2 of \d+ chunks missing"):
        stage.join(into, "demo")
    _carry_all(out, m, into)
    held = into / "demo" / m["chunks"][0]["name"]
    held.write_bytes(held.read_bytes()[:-1] + b"\0")
    with pytest.raises(StageError, match="changed on disk"):
        stage.join(into, "demo")


def test_a_different_bundle_is_not_mixed_in(tmp_path):
    into = tmp_path / "there"
    m1 = stage.bundle(_files(tmp_path), tmp_path / "one", "demo", chunk_bytes=16_384)
    stage.receive(tmp_path / "one" / m1["chunks"][0]["folder"], into)
    (tmp_path / "src0.bin").write_bytes(b"other")
    m2 = stage.bundle(_files(tmp_path)[:1], tmp_path / "two", "demo", chunk_bytes=16_384)
    assert m2["bundle_sha256"] != m1["bundle_sha256"]
    with pytest.raises(StageError, match="different demo bundle"):
        stage.receive(tmp_path / "two" / m2["chunks"][0]["folder"], into)


def test_extract_checks_each_file_against_the_manifest(tmp_path):
    out, into = tmp_path / "stage", tmp_path / "there"
    m = stage.bundle(_files(tmp_path), out, "demo", chunk_bytes=16_384)
    _carry_all(out, m, into)
    m2, tar = stage.join(into, "demo")
    m2["files"][3]["sha256"] = "0" * 64  # a manifest that disagrees with the bytes it describes
    with pytest.raises(StageError, match="f3.bin"):
        stage.extract(tar, tmp_path / "x", m2)


def test_chunk_size_and_names_are_checked(tmp_path):
    with pytest.raises(ValueError, match="below 60 MiB"):
        stage.bundle([], tmp_path, "demo", chunk_bytes=60 << 20)
    with pytest.raises(ValueError, match="group name"):
        stage.bundle([], tmp_path, "a/b", chunk_bytes=1024)
    p = tmp_path / "f"
    p.write_bytes(b"x")
    with pytest.raises(ValueError, match="relative"):
        stage.bundle([("../f", p)], tmp_path / "s", "demo", chunk_bytes=1024)


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def _fake_wheel(d: Path, dist: str = "vfdemo", version: str = "1.0") -> Path:
    members = {f"{dist}/__init__.py": b"__version__ = '1.0'\nVALUE = 42\n", f"{dist}/data/big.onnx": b"\1" * 5000,
               f"{dist}/data/keep.onnx": b"\2" * 100, f"{dist}/data/en_dict": b"en", f"{dist}/data/ru_dict": b"ru",
               f"{dist}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n"
               .encode(), f"{dist}-{version}.dist-info/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: true\n"
               b"Tag: py3-none-any\n"}
    record = [_record_line(n, b) for n, b in members.items()] + [f"{dist}-{version}.dist-info/RECORD,,"]
    path = d / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for n, b in members.items():
            z.writestr(n, b)
        z.writestr(f"{dist}-{version}.dist-info/RECORD", "\n".join(record) + "\n")
    return path


@pytest.mark.parametrize("lzma", [False, True])
def test_slim_wheel_drops_members_and_rewrites_record(tmp_path, lzma):
    src = _fake_wheel(tmp_path)
    dst, dropped = stage.slim_wheel(src, tmp_path / "slim", drop=("vfdemo/data/*.onnx", "vfdemo/data/*_dict"),
                                    keep=("vfdemo/data/keep.onnx", "vfdemo/data/en_dict"), lzma=lzma)
    assert sorted(dropped) == ["vfdemo/data/big.onnx", "vfdemo/data/ru_dict"]
    with zipfile.ZipFile(dst) as z:
        names = set(z.namelist())
        record = z.read("vfdemo-1.0.dist-info/RECORD").decode()
        assert z.read("vfdemo/data/keep.onnx") == b"\2" * 100
        assert {i.compress_type for i in z.infolist()} <= {zipfile.ZIP_LZMA if lzma else zipfile.ZIP_DEFLATED}
    assert "vfdemo/data/big.onnx" not in names and "vfdemo/data/en_dict" in names
    listed = {ln.split(",")[0] for ln in record.splitlines()}
    assert listed == names  # RECORD lists exactly what the wheel holds
    with pytest.raises(ValueError, match="overwrite"):
        stage.slim_wheel(dst, tmp_path / "slim", drop=())


@pytest.mark.parametrize("lzma", [False, True])
def test_install_joins_verifies_and_pip_installs(tmp_path, lzma):
    wheel = _fake_wheel(tmp_path)
    if lzma:  # pip reads LZMA-compressed members (the cuBLAS group is recompressed that way)
        wheel, _ = stage.slim_wheel(wheel, tmp_path / "lz", drop=(), lzma=True)
    out, into, site = tmp_path / "stage", tmp_path / "there", tmp_path / "site"
    m = stage.bundle([(f"wheels/{wheel.name}", wheel)], out, "demo", chunk_bytes=1024)
    _carry_all(out, m, into)
    r = stage.install("demo", into, site)
    assert r.wheels == [wheel.name] and r.stubs == []
    env = dict(os.environ, PYTHONPATH=str(site))
    got = subprocess.run([sys.executable, "-c", "import vfdemo; print(vfdemo.VALUE)"], env=env, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert got == "42"
    rec = json.loads((site / ".voicefast_stage_demo.json").read_text())
    assert rec["manifest_sha256"] == m["bundle_sha256"]
    with pytest.raises(StageError, match="import check failed"):
        stage.check_imports(["vfdemo_not_there"], site)


def test_prepare_slims_by_rule_and_refuses_missing_wheels(tmp_path, monkeypatch):
    dl = tmp_path / "dl"
    dl.mkdir()
    _fake_wheel(dl)
    monkeypatch.setitem(stage.GROUPS, "demo", {"pins": ["vfdemo==1.0"], "imports": []})
    monkeypatch.setitem(stage.SLIM, "vfdemo", {"drop": ("vfdemo/data/*",), "keep": ()})
    m = stage.prepare(dl, "demo", tmp_path / "stage", chunk_mib=1)
    note = m["slimmed"]["vfdemo-1.0-py3-none-any.whl"]
    assert note["dropped_files"] == 4 and note["bytes_after"] < note["bytes_before"]
    monkeypatch.setitem(stage.GROUPS, "demo", {"pins": ["vfdemo==1.0", "other-pkg==2"], "imports": []})
    with pytest.raises(StageError, match="other_pkg"):
        stage.prepare(dl, "demo", tmp_path / "stage")


def test_cli_receive_reports_failure_with_exit_code(tmp_path, capsys):
    assert stage.main(["receive", str(tmp_path / "nope"), "--into", str(tmp_path / "i")]) == 1
    assert "FAILED" in capsys.readouterr().err
