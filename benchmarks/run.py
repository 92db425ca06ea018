"""Run every benchmark and print its figures (``make bench``)."""

from __future__ import annotations

from benchmarks import verify_bundle

BENCHMARKS = [("verify a 50 MB bundle vs sha256sum", verify_bundle.main)]


def main() -> None:
    for title, bench in BENCHMARKS:
        print(f"\n## {title}")
        bench()


if __name__ == "__main__":
    main()
