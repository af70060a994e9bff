"""Golden fixtures: fresh, deterministic, atomic, small, and loud about every kind of damage."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

from parity import fixtures
from parity.cases import CASES
from parity.fixtures import FixtureError, check, generate, load_case, load_manifest, npz_bytes

REPO = Path(__file__).resolve().parent.parent
SMALL = CASES[:3]


def _copy_fixtures(tmp_path: Path) -> Path:
    target = tmp_path / "fixtures"
    shutil.copytree(fixtures.DEFAULT_DIRECTORY, target)
    return target


def _digests(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def test_committed_fixtures_fresh():
    problems = check()
    assert problems == [], "\n".join(problems)


def test_committed_fixtures_size():
    size = sum(p.stat().st_size for p in fixtures.DEFAULT_DIRECTORY.rglob("*") if p.is_file())
    assert size <= 5 * 2**20, f"fixtures take {size / 2**20:.2f} MiB, more than 5 MiB"


def test_generate_same_bytes_across_processes(tmp_path):
    # Three cases and a long one, with the snapshots of every installed implementation.
    script = (
        "import sys; from pathlib import Path; from parity.cases import CASES; from parity.fixtures import generate; "
        "generate(Path(sys.argv[1]), list(CASES[:3]) + [c for c in CASES if c.kind == 'long'][:1])"
    )
    environment = dict(os.environ, PYTHONPATH=str(REPO))
    for name in ("first", "second"):
        subprocess.run([sys.executable, "-c", script, str(tmp_path / name)], check=True, env=environment, timeout=300)
    assert _digests(tmp_path / "first") == _digests(tmp_path / "second")


def test_bfloat16_round_trip_lossless(tmp_path):
    case = next(c for c in CASES if c.dtype == "bfloat16")
    generate(tmp_path, [case], snapshots=False)
    loaded = load_case(case.id, tmp_path)
    fresh = fixtures.case_arrays(case)
    assert loaded["q"].dtype == fresh["q"].dtype
    assert np.array_equal(loaded["q"].view(np.uint16), fresh["q"].view(np.uint16))


def test_stale_case_named():
    # The case table moved on (one case got another theta) but the fixtures were not rewritten.
    changed = dataclasses.replace(CASES[0], theta=20_000.0)
    problems = check(cases=[changed] + list(CASES[1:]))
    assert any(changed.id in line for line in problems), problems


def test_oracle_drift_named(tmp_path, monkeypatch):
    directory = tmp_path / "fixtures"
    generate(directory, SMALL, snapshots=False)
    real = fixtures.rope_reference
    monkeypatch.setattr(fixtures, "rope_reference", lambda *a, **k: real(*a, **k) * (1 + 1e-9))
    problems = check(directory, SMALL)
    assert any(SMALL[0].id in line and "moved" in line for line in problems), problems


def test_missing_manifest_error(tmp_path):
    with pytest.raises(FixtureError, match=r"manifest.json is missing.*python -m parity.fixtures generate"):
        load_manifest(tmp_path)


def test_unknown_format_version_error(tmp_path):
    directory = _copy_fixtures(tmp_path)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["format_version"] = 99
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FixtureError, match=r"format_version 99.*reads format 1.*generate"):
        load_manifest(directory)


def test_invalid_json_error(tmp_path):
    directory = _copy_fixtures(tmp_path)
    (directory / "manifest.json").write_text("{ not json")
    with pytest.raises(FixtureError, match=r"not valid JSON.*generate"):
        load_manifest(directory)


def test_missing_data_file_error(tmp_path):
    directory = _copy_fixtures(tmp_path)
    entry = load_manifest(directory)["cases"][0]
    (directory / entry["file"]).unlink()
    with pytest.raises(FixtureError, match=rf"{entry['file'].split('/')[-1]}.*missing.*generate"):
        load_case(entry["id"], directory)


def test_truncated_data_file_error(tmp_path):
    directory = _copy_fixtures(tmp_path)
    entry = load_manifest(directory)["cases"][0]
    path = directory / entry["file"]
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(FixtureError, match=r"sha256 .* truncated or edited.*generate"):
        load_case(entry["id"], directory)


def test_edited_data_file_error(tmp_path):
    directory = _copy_fixtures(tmp_path)
    entry = load_manifest(directory)["cases"][0]
    path = directory / entry["file"]
    content = bytearray(path.read_bytes())
    content[-10] ^= 0xFF  # one flipped byte inside the last array
    path.write_bytes(bytes(content))
    with pytest.raises(FixtureError, match=rf"{path.name}.*truncated or edited"):
        load_case(entry["id"], directory)
    assert any(entry["id"] in line for line in check(directory))


def test_pickled_array_rejected(tmp_path):
    directory = tmp_path / "fixtures"
    generate(directory, SMALL[:1], snapshots=False)
    manifest = load_manifest(directory)
    entry = manifest["cases"][0]
    path = directory / entry["file"]
    # An object array can only be stored by pickling it.
    np.savez(path, q=np.array([{"payload": 1}], dtype=object), allow_pickle=True)
    entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FixtureError, match=r"cannot be read.*generate"):
        load_case(entry["id"], directory)


KILL_SCRIPT = textwrap.dedent(
    """
    import dataclasses, os, signal, sys
    from pathlib import Path
    from parity import fixtures
    from parity.cases import CASES

    directory, kill_at = Path(sys.argv[1]), int(sys.argv[2])
    writes = 0
    real_replace = os.replace

    def replace_then_maybe_die(source, target):
        global writes
        writes += 1
        if writes == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # temporary file written, not yet renamed
        real_replace(source, target)

    os.replace = replace_then_maybe_die
    # New seeds give every case new content, so every data file and the manifest change.
    changed = [dataclasses.replace(case, seed=case.seed + 1000) for case in CASES[:3]]
    fixtures.generate(directory, changed, snapshots=False)
    """
)


@pytest.mark.parametrize("kill_at", [1, 2, 4], ids=["first-data-file", "second-data-file", "manifest"])
def test_killed_generate_keeps_previous(tmp_path, kill_at):
    directory = tmp_path / "fixtures"
    generate(directory, SMALL, snapshots=False)
    before = {case.id: load_case(case.id, directory) for case in SMALL}

    environment = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(directory), str(kill_at)], env=environment, timeout=300
    )
    assert result.returncode == -9, "the generator was not killed"

    assert check(directory, SMALL) == []
    for case in SMALL:
        after = load_case(case.id, directory)
        assert all(np.array_equal(after[name].view(np.uint8), before[case.id][name].view(np.uint8)) for name in after)


def test_snapshot_drift_names_versions(tmp_path):
    from impls.registry import load_adapter
    from parity.fixtures import load_snapshot, npz_bytes
    from parity.runner import snapshot_drift

    directory = _copy_fixtures(tmp_path)
    adapter = load_adapter("torch_onnx")
    case = next(c for c in CASES if c.id in load_snapshot("torch_onnx", directory)[1])
    assert snapshot_drift(adapter, case, directory) is None

    # Pretend the snapshot came from an older torch whose output differed by 1e-2.
    manifest = load_manifest(directory)
    entry = manifest["snapshots"]["torch_onnx"]
    with np.load(directory / entry["file"], allow_pickle=False) as stored:
        arrays = {name: stored[name] for name in stored.files}
    slug = fixtures._slug(case.id)
    arrays[slug] = (arrays[slug].astype(np.float64) + 1e-2).astype(arrays[slug].dtype)
    content = npz_bytes(arrays)
    (directory / entry["file"]).write_bytes(content)
    entry["sha256"] = hashlib.sha256(content).hexdigest()
    entry["library_version"] = "2.12.0"
    (directory / "manifest.json").write_text(json.dumps(manifest))

    message = snapshot_drift(adapter, case, directory)
    assert message is not None
    assert "torch 2.12.0" in message
    assert f"torch {adapter.version()}" in message


@pytest.mark.parametrize("file_name", ["../../outside.npz", "/tmp/outside.npz", "data/../../x.npz", "data/sub/x.npz"])
def test_path_outside_data_rejected(tmp_path, file_name):
    directory = _copy_fixtures(tmp_path)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["cases"][0]["file"] = file_name
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FixtureError, match=r"is not data/<name>.npz.*generate"):
        load_manifest(directory)


def test_symlinked_data_rejected(tmp_path):
    directory = _copy_fixtures(tmp_path)
    (directory / "data").rename(tmp_path / "elsewhere")
    (directory / "data").symlink_to(tmp_path / "elsewhere")
    entry = load_manifest(directory)["cases"][0]
    with pytest.raises(FixtureError, match="symbolic link"):
        load_case(entry["id"], directory)
    with pytest.raises(FixtureError, match="symbolic link"):
        generate(directory, SMALL, snapshots=False)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.pop("cases"), "'cases' is not a list"),
        (lambda m: m.update(cases={"a": 1}), "'cases' is not a list"),
        (lambda m: m["cases"][0].update(sha256=12345), "no string 'sha256'"),
        (lambda m: m["cases"][0].update(arrays=[]), "no object of arrays"),
        (lambda m: m.update(snapshots=[]), "'snapshots' is not an object"),
        (lambda m: m.update(format_version=True), "format_version True"),
    ],
    ids=["no-cases", "cases-dict", "sha256-int", "arrays-list", "snapshots-list", "version-bool"],
)
def test_malformed_manifest_rejected(tmp_path, change, message):
    directory = _copy_fixtures(tmp_path)
    manifest = json.loads((directory / "manifest.json").read_text())
    change(manifest)
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FixtureError, match=rf"{message}.*generate"):
        load_manifest(directory)


def test_declared_shape_mismatch_rejected(tmp_path):
    directory = tmp_path / "fixtures"
    generate(directory, SMALL[:1], snapshots=False)
    manifest = load_manifest(directory)
    entry = manifest["cases"][0]
    path = directory / entry["file"]
    # A member whose header declares a huge array must be rejected before anything is allocated.
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10**7, 10**7)})
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in entry["arrays"]:
            archive.writestr(f"{name}.npy", header.getvalue() + b"\0" * 64)
    big = buffer.getvalue()
    path.write_bytes(big)
    entry["sha256"] = hashlib.sha256(big).hexdigest()
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FixtureError, match=r"cannot be read.*manifest declares.*generate"):
        load_case(entry["id"], directory)


def test_generate_keeps_unrelated_files(tmp_path):
    directory = tmp_path / "fixtures"
    (directory / "data" / "notes").mkdir(parents=True)
    (directory / "data" / "my_notes.txt").write_text("keep me")
    generate(directory, SMALL[:1], snapshots=False)
    generate(directory, SMALL[1:2], snapshots=False)
    assert (directory / "data" / "my_notes.txt").read_text() == "keep me"
    assert (directory / "data" / "notes").is_dir()
    assert len(list((directory / "data").glob("*.npz"))) == 1
