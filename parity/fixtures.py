"""Golden fixtures: seeded inputs and the oracle's outputs, written by one command.

    python -m parity.fixtures generate   # write fixtures/ from the case table
    python -m parity.fixtures check      # regenerate in memory and compare with fixtures/

Layout of ``fixtures/``:
    manifest.json               format version, generator version, library versions, and per
                                case: parameters, seed, dtype, pairing, tolerance, file name
                                and sha256; per implementation: its snapshot file and version.
    data/<case>-<sha>.npz       one uncompressed npz per case, named by its content hash: the
                                inputs and the oracle's outputs (the truth).
    data/snapshot-<impl>-<sha>.npz
                                each implementation's own rotated queries on the snapshot
                                cases, to detect drift when a library version changes.

Writes are atomic: new data files get new names, the manifest is replaced in one
``os.replace``, and only then are unreferenced data files removed. A run killed at any point
leaves a manifest whose files are all present and intact.

Reading never unpickles (``allow_pickle=False``). bfloat16 arrays are stored as their uint16
bit pattern, with the dtype in the manifest, because npz keeps no bfloat16 dtype.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import re
import sys
import tempfile
import zipfile
from collections.abc import Iterable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from impls.reference import rope_reference
from parity.cases import CASES, CASES_BY_ID, Case, make_inputs, max_abs_position
from parity.tolerance import tolerance

FORMAT_VERSION = 1
# Names of the files `generate` writes into data/: `<slug>-<12 hex digits>.npz`, and the
# temporary files of an interrupted write.
_GENERATED_NAME = re.compile(r"^(\.[A-Za-z0-9_.-]+-[0-9a-f]{12}\.npz\.[A-Za-z0-9_]+\.tmp|[A-Za-z0-9_.-]+-[0-9a-f]{12}\.npz)$")
# Bump when the generator changes what it writes for the same case table.
GENERATOR_VERSION = 1
DEFAULT_DIRECTORY = Path(__file__).resolve().parent.parent / "fixtures"
REGENERATE = "python -m parity.fixtures generate"
# The oracle's float64 outputs may differ in the last bits between NumPy builds, because their
# cos and sin are not correctly rounded. `check` compares them to this relative tolerance, and
# inputs and positions exactly.
ORACLE_RTOL = 1e-12


class FixtureError(RuntimeError):
    """A fixture file that is missing, corrupted, stale or of an unknown format."""


def fixture_directory() -> Path:
    """Return the fixture directory: ``$PARITY_FIXTURES`` if set, else ``fixtures/`` of the repo."""
    override = os.environ.get("PARITY_FIXTURES")
    return Path(override) if override else DEFAULT_DIRECTORY


def _slug(case_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", case_id).strip("_")


def case_arrays(case: Case) -> dict[str, np.ndarray]:
    """Return the inputs of ``case`` and the oracle's float64 outputs ``expected_q``/``expected_k``."""
    arrays = make_inputs(case)
    spec = case.spec
    oracle = dict(theta=spec.theta, pairing=spec.pairing, rotary_dim=spec.rotary_dim, scaling=spec.scaling)
    arrays["expected_q"] = rope_reference(arrays["q"], arrays["q_positions"], **oracle)
    arrays["expected_k"] = rope_reference(arrays["k"], arrays["k_positions"], **oracle)
    return arrays


def _encode(array: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    if array.dtype == ml_dtypes.bfloat16:
        return array.view(np.uint16), {"dtype": "bfloat16", "stored_as": "uint16", "shape": list(array.shape)}
    return array, {"dtype": array.dtype.name, "shape": list(array.shape)}


def _decode(array: np.ndarray, info: dict[str, Any]) -> np.ndarray:
    # Read-only: an implementation under test must not be able to change the goldens it is
    # compared with (frombuffer over bytes already gives a read-only array).
    if info["dtype"] == "bfloat16":
        return array.view(ml_dtypes.bfloat16)
    return array


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """Serialize ``arrays`` as an uncompressed npz whose bytes depend only on the arrays.

    ``np.savez`` stamps each member with the current time. A fixed timestamp and a sorted
    member order make the same arrays give the same sha256 in every run and process.
    """
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name in sorted(arrays):
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            archive.writestr(info, member.getvalue())
    return buffer.getvalue()


def snapshot_cases(cases: Iterable[Case] = CASES) -> list[Case]:
    """Return the cases whose outputs are snapshotted per implementation.

    The long-position cases (where precision changes show first) and one packed case per
    dtype, to stay within the 5 MiB budget of the fixtures.
    """
    chosen, packed_dtypes = [], set()
    for case in cases:
        if case.kind == "long":
            chosen.append(case)
        elif case.kind == "packed" and case.dtype not in packed_dtypes and case.scaling is None and case.rotary_dim is None:
            packed_dtypes.add(case.dtype)
            chosen.append(case)
    return chosen


def _build_snapshots(cases: list[Case], case_data: dict[str, dict[str, np.ndarray]]) -> tuple[dict[str, Any], dict[str, bytes]]:
    # Imported here so that reading fixtures never needs the frameworks.
    from impls.registry import ADAPTERS, AdapterUnavailable, load_adapter
    from parity.runner import run_pieces, unsupported

    entries, files = {}, {}
    for registered in ADAPTERS:
        try:
            adapter = load_adapter(registered.name)
        except AdapterUnavailable as error:
            print(f"No snapshot for {registered.name}: {error}", file=sys.stderr)
            continue
        encoded, case_info = {}, {}
        for case in cases:
            arrays = case_data[case.id]
            if unsupported(adapter, case, arrays, "eager"):
                continue
            name = _slug(case.id)
            encoded[name], case_info[case.id] = _encode(run_pieces(adapter, case, arrays, "eager")["q"])
        if not encoded:
            continue
        content = npz_bytes(encoded)
        digest = hashlib.sha256(content).hexdigest()
        file_name = f"data/snapshot-{registered.name}-{digest[:12]}.npz"
        files[file_name] = content
        entries[registered.name] = {
            "file": file_name,
            "sha256": digest,
            "library": adapter.library,
            "library_version": adapter.version(),
            "cases": case_info,
        }
    return entries, files


def build(cases: Iterable[Case] = CASES, snapshots: bool = True) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Build the manifest and the data files of ``cases`` in memory: ``(manifest, {file: bytes})``."""
    cases = list(cases)
    entries = []
    files: dict[str, bytes] = {}
    case_data = {}
    for case in cases:
        arrays = case_arrays(case)
        case_data[case.id] = arrays
        encoded, array_info = {}, {}
        for name, array in arrays.items():
            encoded[name], array_info[name] = _encode(array)
        content = npz_bytes(encoded)
        digest = hashlib.sha256(content).hexdigest()
        file_name = f"data/{_slug(case.id)}-{digest[:12]}.npz"
        files[file_name] = content

        position = max_abs_position(arrays)
        scale = float(max(np.abs(arrays["expected_q"]).max(), np.abs(arrays["expected_k"]).max()))
        entries.append(
            {
                "id": case.id,
                "file": file_name,
                "sha256": digest,
                "seed": case.seed,
                "dtype": case.dtype,
                "pairing": case.pairing,
                "max_abs_position": position,
                "tolerance": tolerance(case.dtype, position, scale),
                "params": case.params(),
                "arrays": array_info,
            }
        )

    manifest = {
        "format_version": FORMAT_VERSION,
        "generator_version": GENERATOR_VERSION,
        "command": REGENERATE,
        "libraries": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "ml_dtypes": version("ml_dtypes"),
        },
        "cases": entries,
        "snapshots": {},
    }
    if snapshots:
        manifest["snapshots"], snapshot_files = _build_snapshots(snapshot_cases(cases), case_data)
        files.update(snapshot_files)
    return manifest, files


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """Serialize the manifest as stable, readable JSON."""
    return (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()


def _write_atomic(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(content)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def generate(directory: Path | None = None, cases: Iterable[Case] = CASES, snapshots: bool = True) -> dict[str, Any]:
    """Write the fixtures of ``cases`` to ``directory`` atomically and return the manifest.

    With ``snapshots``, every installed implementation is run on the snapshot cases too.
    """
    directory = Path(directory or fixture_directory())
    manifest, files = build(cases, snapshots)

    if str(directory) == "":
        raise FixtureError("The fixture directory is empty; pass a directory such as fixtures/.")
    if directory.exists() and not directory.is_dir():
        raise FixtureError(f"Fixture directory {directory} is a file; pass a directory.")
    if (directory / "data").is_symlink():
        raise FixtureError(f"{directory / 'data'} is a symbolic link; the generator writes only into a real folder.")

    # New content gets new file names, so nothing the current manifest refers to is touched
    # until the manifest itself is replaced.
    for name, content in files.items():
        target = directory / name
        if not target.is_file() or target.read_bytes() != content:
            _write_atomic(target, content)
    _write_atomic(directory / "manifest.json", manifest_bytes(manifest))

    # Only files the generator writes (content-addressed npz and its temporary files) are removed.
    for path in (directory / "data").iterdir():
        generated = _GENERATED_NAME.match(path.name)
        if generated and path.is_file() and not path.is_symlink() and f"data/{path.name}" not in files:
            path.unlink()
    return manifest


_FILE_NAME = re.compile(r"^data/[A-Za-z0-9_.-]+\.npz$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _invalid(path: Path, problem: str) -> FixtureError:
    return FixtureError(f"Fixture manifest {path} is invalid: {problem}. Regenerate the fixtures with `{REGENERATE}`.")


def _check_file_entry(path: Path, where: str, entry: Any) -> None:
    if not isinstance(entry, dict):
        raise _invalid(path, f"{where} is {type(entry).__name__}, not an object")
    for key in ("file", "sha256"):
        if not isinstance(entry.get(key), str):
            raise _invalid(path, f"{where} has no string {key!r}")
    if not _FILE_NAME.match(entry["file"]):
        raise _invalid(path, f"{where} names the file {entry['file']!r}, which is not data/<name>.npz")
    if not _SHA256.match(entry["sha256"]):
        raise _invalid(path, f"{where} has sha256 {entry['sha256']!r}, which is not 64 hex digits")


def _check_array_infos(path: Path, where: str, infos: Any) -> None:
    if not isinstance(infos, dict) or not infos:
        raise _invalid(path, f"{where} has no object of arrays")
    for name, info in infos.items():
        shape = info.get("shape") if isinstance(info, dict) else None
        if not (isinstance(shape, list) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
            raise _invalid(path, f"{where} array {name!r} has no valid shape")
        if not isinstance(info.get("dtype"), str):
            raise _invalid(path, f"{where} array {name!r} has no dtype")


def _validate_manifest(path: Path, manifest: Any) -> None:
    if not isinstance(manifest, dict):
        raise _invalid(path, f"the top level is {type(manifest).__name__}, not an object")
    found = manifest.get("format_version")
    if isinstance(found, bool) or found != FORMAT_VERSION:
        raise FixtureError(
            f"Fixture manifest {path} has format_version {found!r}, but this suite reads format "
            f"{FORMAT_VERSION}. Regenerate the fixtures with `{REGENERATE}`."
        )
    cases = manifest.get("cases")
    if not isinstance(cases, list):
        raise _invalid(path, "'cases' is not a list")
    for index, entry in enumerate(cases):
        where = f"cases[{index}]"
        _check_file_entry(path, where, entry)
        if not isinstance(entry.get("id"), str):
            raise _invalid(path, f"{where} has no string 'id'")
        for key in ("tolerance", "max_abs_position"):
            if isinstance(entry.get(key), bool) or not isinstance(entry.get(key), (int, float)):
                raise _invalid(path, f"{where} has no number {key!r}")
        if not isinstance(entry.get("params"), dict):
            raise _invalid(path, f"{where} has no object 'params'")
        _check_array_infos(path, where, entry.get("arrays"))
    snapshots = manifest.get("snapshots", {})
    if not isinstance(snapshots, dict):
        raise _invalid(path, "'snapshots' is not an object")
    for impl, entry in snapshots.items():
        where = f"snapshots[{impl!r}]"
        _check_file_entry(path, where, entry)
        for key in ("library", "library_version"):
            if not isinstance(entry.get(key), str):
                raise _invalid(path, f"{where} has no string {key!r}")
        _check_array_infos(path, where, entry.get("cases"))


def load_manifest(directory: Path | None = None) -> dict[str, Any]:
    """Read and validate ``manifest.json``; raise FixtureError naming the file and the fix."""
    path = Path(directory or fixture_directory()) / "manifest.json"
    if path.is_symlink() or not path.is_file():
        problem = "a symbolic link" if path.is_symlink() else "missing"
        raise FixtureError(f"Fixture manifest {path} is {problem}. Regenerate the fixtures with `{REGENERATE}`.")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise FixtureError(
            f"Fixture manifest {path} is not valid JSON ({type(error).__name__}). Regenerate it with `{REGENERATE}`."
        ) from error
    _validate_manifest(path, manifest)
    return manifest


def _entry(manifest: dict[str, Any], case_id: str, directory: Path) -> dict[str, Any]:
    for entry in manifest["cases"]:
        if entry["id"] == case_id:
            return entry
    raise FixtureError(
        f"Case {case_id!r} is not in {directory / 'manifest.json'}: the fixtures are older than "
        f"the case table. Regenerate them with `{REGENERATE}`."
    )


def _stored_dtype(info: dict[str, Any]) -> np.dtype:
    if info["dtype"] == "bfloat16":
        return np.dtype(np.uint16)
    return np.dtype(info["dtype"])


def _read_verified(directory: Path, name: str, sha256: str, what: str, infos: dict[str, dict]) -> dict[str, np.ndarray]:
    """Read the npz ``name`` under ``directory``, checking its hash and each array against ``infos``.

    Only the members listed in ``infos`` are read, after their headers match the manifest's
    dtype and shape, so a crafted file can neither unpickle nor allocate more than declared.
    """
    path = directory / name
    if (directory / "data").is_symlink() or path.is_symlink():
        raise FixtureError(f"Fixture file {path} for {what} is behind a symbolic link. Regenerate it with `{REGENERATE}`.")
    if not path.is_file():
        raise FixtureError(f"Fixture file {path} for {what} is missing. Regenerate it with `{REGENERATE}`.")
    content = path.read_bytes()
    digest = hashlib.sha256(content).hexdigest()
    if digest != sha256:
        raise FixtureError(
            f"Fixture file {path} for {what} has sha256 {digest[:16]}..., but the manifest records "
            f"{sha256[:16]}...: the file was truncated or edited. Regenerate it with `{REGENERATE}`."
        )

    arrays = {}
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as archive:
            members = {info.filename: info for info in archive.infolist()}
            for array_name, info in infos.items():
                member = members.get(f"{array_name}.npy")
                if member is None:
                    raise ValueError(f"it lacks the array {array_name!r}")
                if member.compress_type != zipfile.ZIP_STORED:
                    raise ValueError(f"array {array_name!r} is compressed, which the generator never writes")
                dtype, shape = _stored_dtype(info), tuple(info["shape"])
                with archive.open(member) as stream:
                    version = np.lib.format.read_magic(stream)
                    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                    header_shape, fortran, header_dtype = read_header(stream)
                    if header_dtype != dtype or tuple(header_shape) != shape or fortran:
                        raise ValueError(
                            f"array {array_name!r} is {header_dtype}{list(header_shape)}, but the manifest "
                            f"declares {dtype}{list(shape)}"
                        )
                    data = stream.read(dtype.itemsize * int(np.prod(shape)) + 1)
                if len(data) != dtype.itemsize * int(np.prod(shape)):
                    raise ValueError(f"array {array_name!r} has {len(data)} bytes of data, not {dtype.itemsize * int(np.prod(shape))}")
                arrays[array_name] = np.frombuffer(data, dtype).reshape(shape)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as error:
        raise FixtureError(f"Fixture file {path} cannot be read: {error}. Regenerate it with `{REGENERATE}`.") from error
    return arrays


def load_case(case_id: str, directory: Path | None = None, manifest: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """Load one case's arrays, checking the file's sha256 against the manifest."""
    directory = Path(directory or fixture_directory())
    manifest = manifest or load_manifest(directory)
    entry = _entry(manifest, case_id, directory)
    arrays = _read_verified(directory, entry["file"], entry["sha256"], f"case {case_id!r}", entry["arrays"])
    return {name: _decode(arrays[name], info) for name, info in entry["arrays"].items()}


def load_snapshot(impl: str, directory: Path | None = None, manifest: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Return ``(entry, {case id: rotated queries})`` of one implementation's snapshot."""
    directory = Path(directory or fixture_directory())
    manifest = manifest or load_manifest(directory)
    entry = manifest.get("snapshots", {}).get(impl)
    if entry is None:
        raise FixtureError(
            f"{directory / 'manifest.json'} has no snapshot of {impl!r} (it was not installed when the "
            f"fixtures were written). Regenerate them with `{REGENERATE}`."
        )
    infos = {_slug(case_id): info for case_id, info in entry["cases"].items()}
    arrays = _read_verified(directory, entry["file"], entry["sha256"], f"the snapshot of {impl!r}", infos)
    return entry, {case_id: _decode(arrays[_slug(case_id)], info) for case_id, info in entry["cases"].items()}


def check(directory: Path | None = None, cases: Iterable[Case] = CASES) -> list[str]:
    """Regenerate in memory and return one line per stale, missing or corrupted case (empty: fresh)."""
    directory = Path(directory or fixture_directory())
    cases = list(cases)
    try:
        manifest = load_manifest(directory)
    except FixtureError as error:
        return [str(error)]

    problems = []
    stored_ids = [entry["id"] for entry in manifest["cases"]]
    wanted_ids = [case.id for case in cases]
    for case_id in sorted(set(stored_ids) - set(wanted_ids)):
        problems.append(f"{case_id}: in the fixtures but no longer in the case table")
    if manifest.get("generator_version") != GENERATOR_VERSION:
        problems.append(
            f"manifest.json: written by generator version {manifest.get('generator_version')}, "
            f"this is version {GENERATOR_VERSION}"
        )

    for case in cases:
        if case.id not in stored_ids:
            problems.append(f"{case.id}: in the case table but not in the fixtures")
            continue
        try:
            stored = load_case(case.id, directory, manifest)
        except FixtureError as error:
            problems.append(f"{case.id}: {error}")
            continue
        entry = _entry(manifest, case.id, directory)
        if entry["params"] != json.loads(json.dumps(case.params())):
            problems.append(f"{case.id}: parameters differ from the case table")
            continue
        fresh = case_arrays(case)
        for name, array in fresh.items():
            old = stored.get(name)
            if old is None or old.shape != array.shape or old.dtype != array.dtype:
                problems.append(f"{case.id}: array {name} changed shape or dtype")
            elif name.startswith("expected_"):
                if not np.allclose(old, array, rtol=ORACLE_RTOL, atol=0.0):
                    error = float(np.max(np.abs(old - array)))
                    problems.append(f"{case.id}: oracle output {name} moved by {error:.3e}")
            elif not np.array_equal(old.view(np.uint8), array.view(np.uint8)):
                problems.append(f"{case.id}: input {name} changed")

    # Snapshots depend on the installed libraries, so only their integrity is checked here;
    # parity/test_rotation.py reports drift.
    for impl in manifest.get("snapshots", {}):
        try:
            load_snapshot(impl, directory, manifest)
        except FixtureError as error:
            problems.append(f"snapshot {impl}: {error}")
    return problems


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: ``generate`` or ``check``."""
    parser = argparse.ArgumentParser(prog="python -m parity.fixtures", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("generate", "check"), help="write the fixtures, or compare them with a fresh build")
    parser.add_argument("--dir", type=Path, default=None, help="fixture directory (default: fixtures/ of the repository)")
    args = parser.parse_args(argv)
    directory = args.dir or fixture_directory()

    if args.command == "generate":
        manifest = generate(directory)
        size = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
        print(f"Wrote {len(manifest['cases'])} cases to {directory} ({size / 2**20:.2f} MiB).")
        return 0

    problems = check(directory)
    if problems:
        print(f"{len(problems)} fixture problem(s) in {directory}; regenerate with `{REGENERATE}`:", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        return 1
    print(f"Fixtures in {directory} match the case table ({len(CASES)} cases).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
