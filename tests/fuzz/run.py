"""One coverage-guided fuzz target under atheris (libFuzzer for Python).

    .venv/bin/python tests/fuzz/run.py TARGET [libFuzzer options] [CORPUS_DIR ...]

Normally started by scripts/fuzz, which prepares the corpus directory and
collects the statistics. Needs `pip install atheris` (Linux wheels; tested
with atheris 3.0.0 on CPython 3.11). A crash (an exception that is not one of
rescue's classified errors, or a hang past -timeout) is written by libFuzzer as
crash-*/timeout-* under -artifact_prefix; keep it under
tests/fuzz/regressions/TARGET/ once fixed, where tests/fuzz/test_fuzz.py replays it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))          # targets.py
sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))   # the repo

with atheris.instrument_imports(include=["rescue"]):
    # Everything the targets reach, imported here so atheris instruments it
    # (the registries import their readers lazily, which would escape it).
    from importlib import import_module

    import rescue.disk
    import rescue.disk.mapping
    import rescue.fs.base
    import rescue.source.archives
    import rescue.source.codecs
    import rescue.volume
    import rescue.volume.lvm
    import rescue.volume.partitions
    import rescue.volume.probe
    import targets
    for _format in rescue.disk.FORMATS:
        import_module(f"rescue.disk.{_format}")
    for _codec in rescue.source.codecs.CODECS:
        import_module(f"rescue.source.codecs.{_codec}")
    for _format in rescue.source.archives.FORMATS:
        import_module(f"rescue.source.archives.{_format}")
    for _spec, _ in targets.FS_BASES.values():
        try:
            targets._reader(_spec)
        except (ImportError, AttributeError):
            pass


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in targets.TARGETS:
        sys.exit(f"usage: run.py TARGET [libFuzzer options] [CORPUS_DIR ...]; targets: {', '.join(targets.TARGETS)}")
    name = sys.argv.pop(1)
    target = targets.TARGETS[name]
    if name not in targets.RAW and targets.fs_base(name) is None:
        sys.exit(f"{name}: no base image in fixtures/ (or no reader) in this checkout")
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
