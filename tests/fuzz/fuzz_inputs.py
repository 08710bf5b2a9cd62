"""Fuzzing the readers of untrusted input: the DICOM reader (fast header scan and pydicom paths,
pixel decoding), preprocessing of a study that holds the fuzzed slice, and the CSV index.

The only outcome allowed for bad bytes is a `BadInputError` (a one-line error naming the file);
any other exception is a bug. Two engines share one target:

    python -m tests.fuzz.fuzz_inputs -max_total_time=60     # atheris (coverage-guided, libFuzzer flags)
    python -m tests.fuzz.fuzz_inputs --mutate 60            # seeded random mutation, no atheris

`make fuzz SECONDS=...` runs atheris. The seeds are written at start (never committed): a phantom
study's slices and CSVs and one slice in every transfer syntax the reader supports.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DICOM, CSV = 0, 1  # first byte of an input: which target


def write_seeds(folder: Path) -> list[bytes]:
    """Seed inputs (target byte + file bytes): phantom slices and CSVs, every transfer syntax."""
    from lumbar_tf.synthetic.phantom import synthesize_dataset
    from tests.dicom_factory import TRANSFER_SYNTAXES, SeriesSpec
    from tests.hostile_files import valid_file

    seeds = []
    phantom = synthesize_dataset(folder / "phantom", 1, seed=3)
    for path in sorted((phantom / "train_images").rglob("*.dcm"))[::12]:
        seeds.append(bytes([DICOM]) + path.read_bytes())
    for syntax in TRANSFER_SYNTAXES:
        path = valid_file(folder / f"{syntax}.dcm", SeriesSpec(n_slices=1), syntax)
        seeds.append(bytes([DICOM]) + path.read_bytes())
    for path in sorted(phantom.glob("*.csv")):
        seeds.append(bytes([CSV]) + path.read_bytes()[:4000])
    shutil.rmtree(folder / "phantom")
    return seeds


class Target:
    """Runs one input in a scratch folder; raises only on a bug."""

    def __init__(self, workdir: Path):
        from lumbar_tf.core.config import PreprocessConfig
        from tests.dicom_factory import SeriesSpec, write_series

        self.workdir = workdir
        self.study = workdir / "study" / "1001"
        paths, _ = write_series(self.study / "11", SeriesSpec(n_slices=3, rows=16, cols=20))
        self.victim = paths[1]
        self.data = workdir / "data"
        (self.data / "train_images").mkdir(parents=True)
        self.cfg = PreprocessConfig(view_size=32, crop_size=16)

    def __call__(self, data: bytes) -> None:
        from lumbar_tf.core.errors import BadInputError

        if not data:
            return
        kind, body = data[0] % 2, data[1:]
        try:
            self._dicom(body) if kind == DICOM else self._csv(body)
        except BadInputError as exc:
            if "\n" in str(exc):
                raise AssertionError(f"error message of more than one line: {exc!r}") from None

    def _dicom(self, body: bytes) -> None:
        from lumbar_tf import preprocess
        from lumbar_tf.core.errors import BadInputError
        from lumbar_tf.dicom import reader

        self.victim.write_bytes(body)
        try:
            header, _ = reader.read_instance_header(self.victim)
            reader.decode_instance(header)
        finally:  # the pydicom path too, whatever the fast scan made of the file
            with contextlib.suppress(BadInputError):
                reader._tags_by_pydicom(self.victim)
        study = reader.read_study(self.study.parent / "1001")
        preprocess.build_views(study, self.cfg)

    def _csv(self, body: bytes) -> None:
        from lumbar_tf.core.errors import BadInputError
        from lumbar_tf.data.dataset import read_index
        from lumbar_tf.dicom.reader import read_series_descriptions

        (self.data / "train.csv").write_bytes(body)
        (self.data / "train_series_descriptions.csv").write_bytes(body)
        with contextlib.suppress(BadInputError):
            read_series_descriptions(self.data / "train_series_descriptions.csv")
        (self.data / "train_series_descriptions.csv").unlink()
        read_index(self.data)


_INTERESTING = [
    b"\x00",
    b"\xff",
    b"\xff\xff",
    b"\xff\xff\xff\xff",
    b"\x00\x00\x00\x80",
    b"\\",
    b"1e308",
    b"-1",
]


def mutate(data: bytes, rng: random.Random, seeds: list[bytes]) -> bytes:
    """One to four random edits: flips, interesting values (lengths!), insertions, cuts, splices."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        pos = rng.randrange(1, max(2, len(out)))
        op = rng.randrange(6)
        if op == 0 and len(out) > 1:
            out[pos % len(out)] ^= 1 << rng.randrange(8)
        elif op == 1:
            value = rng.choice(_INTERESTING)
            out[pos : pos + len(value)] = value
        elif op == 2:
            out[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif op == 3:
            del out[pos : pos + rng.randint(1, 256)]
        elif op == 4:
            out = out[: max(1, pos)]
        else:
            other = rng.choice(seeds)
            start = rng.randrange(1, max(2, len(other)))
            out[pos:pos] = other[start : start + rng.randint(1, 512)]
    return bytes(out)


def run_mutations(
    target: Target, seeds: list[bytes], *, runs: int | None, seconds: float | None, seed: int = 0
):
    """Seeded random mutation over ``seeds`` for ``runs`` inputs or ``seconds``; returns the count.

    A bug raises, with the input saved beside the working folder as ``crash-<n>.bin``.
    """
    rng = random.Random(seed)
    end = None if seconds is None else time.monotonic() + seconds
    n = 0
    for data in seeds:  # every seed must read clean first
        target(data)
    while (runs is None or n < runs) and (end is None or time.monotonic() < end):
        data = mutate(rng.choice(seeds), rng, seeds)
        try:
            target(data)
        except Exception:
            crash = target.workdir.parent / f"crash-{n}.bin"
            crash.write_bytes(data)
            print(f"crash input saved to {crash}", file=sys.stderr)
            raise
        n += 1
    return n


def main(argv: list[str]) -> int:
    import resource
    import warnings

    warnings.simplefilter("ignore")
    cap = 2 * 2**30  # a memory bomb is a crash, not a swapping machine
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    work = Path(tempfile.mkdtemp(prefix="lumbar_fuzz_"))
    seeds = write_seeds(work / "seeds")
    target = Target(work / "scratch")
    if argv[:1] == ["--mutate"]:
        seconds = float(argv[1]) if len(argv) > 1 else 60.0
        n = run_mutations(target, seeds, runs=None, seconds=seconds, seed=int(os.environ.get("FUZZ_SEED", 0)))
        print(f"{n} inputs in {seconds:g} s, no crash")
        return 0
    import atheris

    corpus = work / "corpus"
    corpus.mkdir()
    for i, data in enumerate(seeds):
        (corpus / f"seed-{i}").write_bytes(data)
    atheris.Setup([sys.argv[0], *argv, "-rss_limit_mb=2048", str(corpus)], target)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    if "--mutate" not in sys.argv:
        import atheris

        with atheris.instrument_imports(include=["lumbar_tf", "pydicom"]):
            import lumbar_tf.data.dataset  # noqa: F401
            import lumbar_tf.dicom.reader  # noqa: F401
            import lumbar_tf.preprocess  # noqa: F401
    sys.exit(main(sys.argv[1:]))
