#!/usr/bin/env bash
# Builds every fuzz target and runs each for a bounded time; exits non-zero on a crash.
#
# Works with the stable toolchain only: cargo-fuzz's nightly flags (-Zsanitizer, sancov passes)
# are accepted by stable rustc under RUSTC_BOOTSTRAP=1. Needs a C++ compiler (libfuzzer-sys
# builds libFuzzer) and crates.io.
#
#   FUZZ_SECONDS=10        seconds per target (default 10)
#   FUZZ_TARGETS="a b"     only these targets (default: all, from `cargo fuzz list`)
#   FUZZ_SANITIZER=none    none | address (default none: the crate has no unsafe code, and
#                          debug assertions and overflow checks stay on in fuzz builds)
#   FUZZ_JOBS=N            build jobs (default: cargo's)
set -euo pipefail

cd "$(dirname "$0")"
seconds="${FUZZ_SECONDS:-10}"
sanitizer="${FUZZ_SANITIZER:-none}"
# (cargo-fuzz 0.13 has no build-jobs flag; Cargo reads CARGO_BUILD_JOBS.)
if [[ -n "${FUZZ_JOBS:-}" ]]; then export CARGO_BUILD_JOBS="$FUZZ_JOBS"; fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "run.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1

targets="${FUZZ_TARGETS:-$(cargo fuzz list | tr "\n" " ")}"

echo "run.sh: building targets: $targets" >&2
cargo fuzz build --sanitizer "$sanitizer"

status=0
for target in $targets; do
    mkdir -p "corpus/$target"
    seeds=()
    if [[ -d "seeds/$target" ]]; then seeds=("seeds/$target"); fi
    echo "run.sh: fuzzing $target for ${seconds}s" >&2
    # The first corpus directory collects new inputs; seed directories are read only.
    if ! cargo fuzz run --sanitizer "$sanitizer" "$target" "corpus/$target" "${seeds[@]}" -- \
        -max_total_time="$seconds" -print_final_stats=1 2> >(tee "corpus/$target.log" >&2); then
        echo "run.sh: $target FAILED (see fuzz/artifacts/$target/)" >&2
        status=1
    fi
    sleep 0.2 # let tee finish
    execs=$(grep -E '^stat::number_of_executed_units' "corpus/$target.log" | awk '{print $2}' | tail -1)
    echo "run.sh: $target: ${execs:-?} executions" >&2
done
exit "$status"
