#!/usr/bin/env bash
# Builds the fuzz targets with libFuzzer (stable Rust: the coverage instrumentation
# cargo-fuzz would add, passed by hand) and runs each for a bounded time.
#
#   fuzz/run.sh [SECONDS] [TARGET...]
#
# SECONDS: how long each target runs (default 60). TARGET: frame, module, link (default:
# all three). Needs a C++ compiler (libfuzzer-sys builds libFuzzer) and network access to
# crates.io for the first build only. Exits non-zero as soon as a target finds a crash,
# leak, timeout or out-of-memory input; the input is left in fuzz/artifacts/TARGET/ and
# can be replayed with `fuzz/run.sh --replay TARGET FILE`.
#
# Seeds are in fuzz/seeds/TARGET/ and update-server/testdata/modules/ (committed); what the fuzzer finds on the way is kept
# in fuzz/corpus/TARGET/ (not committed) so later runs start from there.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cd "$here"

triple=$(rustc -vV | sed -n 's/^host: //p')
export RUSTFLAGS="-Cpasses=sancov-module \
 -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
 -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares \
 --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
# --target keeps build scripts and proc macros uninstrumented (as cargo-fuzz does).
build() {
    cargo build --quiet --release --locked --target "$triple" --bins
}
bin_dir="${CARGO_TARGET_DIR:-$here/target}/$triple/release"

if [[ ${1:-} == --replay ]]; then
    [[ $# -eq 3 ]] || { echo "usage: $0 --replay TARGET FILE" >&2; exit 2; }
    build
    exec "$bin_dir/$2" "$3"
fi

secs=${1:-60}
shift || true
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(frame module link)

build
status=0
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    extra_seeds=()
    # The real patch modules of the unit tests seed the module and link targets.
    [[ $t == frame ]] || extra_seeds=(../update-server/testdata/modules)
    echo "== fuzz target $t: ${secs}s"
    # -rss_limit_mb also caps single allocations: a parser that trusts a size field fails
    # here instead of passing by luck. -timeout: one input must not take seconds.
    if ! "$bin_dir/$t" -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 \
        -print_final_stats=1 -artifact_prefix="artifacts/$t/" \
        "corpus/$t" "seeds/$t" "${extra_seeds[@]}"; then
        echo "fuzz target $t FAILED: reproducer in fuzz/artifacts/$t/" >&2
        status=1
    fi
done
exit $status
