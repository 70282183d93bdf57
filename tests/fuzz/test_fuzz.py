"""The fuzz targets (tests/fuzz/targets.py) without atheris: every seed and
every crash input kept under tests/fuzz/regressions/ is replayed, then a short
deterministic mutation run (bit flips, byte sets, cuts, splices: the same
inputs every time) checks that damaged input only ever raises rescue's own
classified errors. The coverage-guided runs are scripts/fuzz (atheris)."""

from __future__ import annotations

import os
import random
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))   # targets.py beside this file
import targets  # noqa: E402

PER_INPUT_SECONDS = 20          # a hang is a bug too
# A fixed number of mutations (about 5 s each on a 2-core machine), not a time budget: a faster
# machine must run the very inputs this one passed. RESCUE_FUZZ_SCALE=20 runs 20 times as many.
MUTATIONS = {"container": 4000, "archive": 8000, "volume": 1200, "ext": 800, "xfs": 60, "btrfs": 1000}
SCALE = float(os.environ.get("RESCUE_FUZZ_SCALE", "1"))
INTERESTING = [0, 1, 0x7F, 0x80, 0xFF]
INTERESTING32 = [0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 512, 4096, 65536]


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


def _run(target: str, data: bytes) -> None:
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(PER_INPUT_SECONDS)
    try:
        targets.TARGETS[target](data)
    except Hang:
        pytest.fail(f"{target}: input of {len(data)} bytes ran past {PER_INPUT_SECONDS} s")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _available(target: str) -> None:
    if target not in targets.RAW and targets.fs_base(target) is None:
        pytest.skip(f"{target}: no base image under fixtures/ (or no reader) in this checkout")


def mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    """One to eight of libFuzzer's classic mutations, deterministic for a seed."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(7)
        if not out:
            out += rng.randbytes(rng.randint(1, 64))
            continue
        at = rng.randrange(len(out))
        if op == 0:
            out[at] ^= 1 << rng.randrange(8)
        elif op == 1:
            out[at] = rng.choice(INTERESTING)
        elif op == 2 and len(out) >= at + 4:
            out[at:at + 4] = rng.choice(INTERESTING32).to_bytes(4, rng.choice(["little", "big"]))
        elif op == 3:
            del out[rng.randrange(len(out)):]           # a cut: the commonest damage
        elif op == 4:
            n = rng.randint(1, 512)
            out[at:at + n] = bytes(min(n, len(out) - at))
        elif op == 5 and pool:
            other = rng.choice(pool)
            if other:
                start = rng.randrange(len(other))
                out[at:at + 64] = other[start:start + 64]
        else:
            out[at:at] = rng.randbytes(rng.randint(1, 16))
    return bytes(out)


@pytest.mark.parametrize("target", list(targets.TARGETS))
def test_seeds_and_kept_crashes_replay_cleanly(target):
    _available(target)
    inputs = targets.seeds(target) + [p.read_bytes() for p in targets.regressions(target)]
    assert inputs, f"{target}: no seeds"
    for data in inputs:
        _run(target, data)


@pytest.mark.parametrize("target", list(targets.TARGETS))
def test_deterministic_mutations_raise_only_classified_errors(target):
    _available(target)
    pool = targets.seeds(target)
    if target not in targets.RAW:
        pool = pool + [random.Random(i).randbytes(320) for i in range(4)]
    rng = random.Random(f"rescue-fuzz-{target}")
    for runs in range(int(MUTATIONS[target] * SCALE)):
        data = mutate(rng, rng.choice(pool), pool)
        try:
            _run(target, data)
        except BaseException:   # a crash or a hang: keep the input, so it can become a regression
            out = Path(targets.REGRESSIONS.parent / "crashes")
            out.mkdir(exist_ok=True)
            (out / f"{target}-mutation-{runs}").write_bytes(data)
            raise
