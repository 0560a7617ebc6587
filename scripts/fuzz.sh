#!/usr/bin/env bash
# Coverage-guided fuzzing on stable Rust: libFuzzer through libfuzzer-sys,
# with LLVM's SanitizerCoverage pass switched on by stable -C flags
# (docs/fuzzing.md says why not cargo-fuzz).
#
#   scripts/fuzz.sh build                  build every target
#   scripts/fuzz.sh run TARGET [ARGS...]   fuzz TARGET over its corpus and seeds;
#                                          ARGS go to libFuzzer (-runs=N, -max_total_time=S, ...);
#                                          if the first ARG is a file, only replay the files given
#   scripts/fuzz.sh short                  CI: build, then each target over its kept corpus
#                                          plus a fixed number of runs from a fixed seed
#                                          (FUZZ_SEED, 1), about 15 s each; fails on any crash
#   scripts/fuzz.sh long [TARGET...]       FUZZ_RUNS (10,000,000) executions of each target;
#                                          new inputs go to fuzz/work/TARGET (not kept)
#   scripts/fuzz.sh merge TARGET           minimise corpus + seeds + work into fuzz/corpus/TARGET
#   scripts/fuzz.sh list                   the targets
#
# Everything runs under `nice -n 19` (FUZZ_NICE) and builds in fuzz/target
# (CARGO_TARGET_DIR), never taking the main target directory's lock.
# Crash inputs land in fuzz/artifacts/TARGET/.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FUZZ="$REPO/fuzz"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$FUZZ/target}"
NICE=(nice -n "${FUZZ_NICE:-19}")
TARGETS=(startup frame backend audit_tap saml config proof das)

# Longest input per target: a startup packet may be 10,000 bytes, a SAML
# response a few KiB, a gateway proof 8 KiB (and a little more, to cross
# the limit), an activity stream message a few KiB; the rest are a handful of messages or a config file.
max_len() {
    case "$1" in
        startup) echo 10240 ;;
        saml) echo 8192 ;;
        proof) echo 9000 ;;
        das) echo 8192 ;;
        *) echo 4096 ;;
    esac
}

# Runs per target in CI, about 15 s each on a 2-core machine (audit_tap
# runs about 9,000 inputs a second, the others 20,000 or more).
short_runs() {
    case "$1" in
        audit_tap) echo 150000 ;;
        *) echo 300000 ;;
    esac
}

# SanitizerCoverage as cargo-fuzz sets it up, with stable flags only: 8-bit
# counters and the PC table (libFuzzer's coverage), compare tracing (its
# value profile and CMP dictionaries). No sanitizer: -Zsanitizer is nightly.
# Debug assertions and overflow checks come from fuzz/Cargo.toml's profile.
RUSTFLAGS_FUZZ="-Cpasses=sancov-module \
-Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
-Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares \
--cfg fuzzing -Cdebug-assertions -Coverflow-checks"

die() {
    echo "fuzz.sh: $*" >&2
    exit 1
}

host() {
    rustc -vV | sed -n 's/^host: //p'
}

bin_dir() {
    echo "$CARGO_TARGET_DIR/$(host)/release"
}

is_target() {
    local t
    for t in "${TARGETS[@]}"; do
        [[ $t == "$1" ]] && return 0
    done
    return 1
}

# libfuzzer-sys compiles libFuzzer (C++) with the cc crate; pg_query runs
# bindgen, which needs libclang. Installed on a fresh Debian machine when
# run as root, as scripts/setup-test-env.sh does for the tests.
ensure_deps() {
    local missing=()
    command -v c++ >/dev/null 2>&1 || missing+=(g++)
    if ! compgen -G "/usr/lib/llvm-*/lib/libclang*.so*" >/dev/null &&
        ! compgen -G "/usr/lib/*/libclang*.so*" >/dev/null &&
        [[ -z ${LIBCLANG_PATH:-} ]]; then
        missing+=(libclang-dev)
    fi
    ((${#missing[@]})) || return 0
    if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
        die "missing ${missing[*]} (a C++ compiler for libFuzzer, libclang for pg_query's bindgen)"
    fi
    echo "fuzz.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

build() {
    ensure_deps
    # --target keeps RUSTFLAGS off build scripts and proc macros, which
    # are not linked with libFuzzer.
    (cd "$FUZZ" && env -u CARGO_ENCODED_RUSTFLAGS RUSTFLAGS="$RUSTFLAGS_FUZZ" \
        "${NICE[@]}" cargo build --locked --release --target "$(host)" --bins)
}

# fuzz TARGET WRITABLE_CORPUS ARGS...: fuzz over the kept corpus and the
# seeds; new inputs are written to WRITABLE_CORPUS only.
fuzz() {
    local t="$1" out="$2"
    shift 2
    local bin
    bin="$(bin_dir)/$t"
    [[ -x $bin ]] || die "$bin is not built: run scripts/fuzz.sh build"
    mkdir -p "$FUZZ/corpus/$t" "$FUZZ/artifacts/$t" "$out"
    local dirs=("$out")
    [[ $out == "$FUZZ/corpus/$t" ]] || dirs+=("$FUZZ/corpus/$t")
    dirs+=("$FUZZ/seeds/$t")
    "${NICE[@]}" "$bin" -artifact_prefix="$FUZZ/artifacts/$t/" -max_len="$(max_len "$t")" \
        -print_final_stats=1 "$@" "${dirs[@]}"
}

cmd="${1:-}"
shift || true
case "$cmd" in
    build)
        build
        ;;
    list)
        printf '%s\n' "${TARGETS[@]}"
        ;;
    run)
        t="${1:-}"
        is_target "$t" || die "run TARGET [ARGS...]: TARGET is one of ${TARGETS[*]}"
        shift
        if [[ $# -gt 0 && -f $1 ]]; then
            # Replay inputs (a crash, a corpus file): libFuzzer runs each once.
            exec "${NICE[@]}" "$(bin_dir)/$t" "$@"
        fi
        fuzz "$t" "$FUZZ/corpus/$t" "$@"
        ;;
    short)
        build
        # A fixed seed and a fixed count, not a clock: the same commit
        # fuzzes the same inputs on every machine, so CI's verdict can be
        # reproduced and does not change between two runs of one commit.
        # New ground is what `long` runs are for (their finds are kept).
        seed="${FUZZ_SEED:-1}"
        failed=()
        for t in "${TARGETS[@]}"; do
            scratch="$(mktemp -d)"
            runs="$(short_runs "$t")"
            echo "== $t: kept corpus, then $runs runs from seed $seed"
            # -max_total_time only guards CI's budget on a slow machine.
            if ! fuzz "$t" "$scratch" -seed="$seed" -runs="$runs" -max_total_time=120 -timeout=10 \
                >"$scratch.log" 2>&1; then
                failed+=("$t")
                tail -n 60 "$scratch.log"
            else
                grep -E '^(INFO: Loaded|#[0-9]+ +(INITED|DONE))|stat::number_of_executed_units' \
                    "$scratch.log" || true
            fi
            rm -rf "$scratch" "$scratch.log"
        done
        if ((${#failed[@]})); then
            echo "fuzz.sh short: FAILED: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
            exit 1
        fi
        echo "fuzz.sh short: ${#TARGETS[@]} targets, no crash"
        ;;
    long)
        (($#)) || set -- "${TARGETS[@]}"
        for t in "$@"; do
            is_target "$t" || die "unknown target $t"
        done
        for t in "$@"; do
            echo "== $t: ${FUZZ_RUNS:-10000000} runs"
            fuzz "$t" "$FUZZ/work/$t" -runs="${FUZZ_RUNS:-10000000}" -timeout=10 \
                ${FUZZ_MAX_TIME:+-max_total_time="$FUZZ_MAX_TIME"}
        done
        ;;
    merge)
        t="${1:-}"
        is_target "$t" || die "merge TARGET: TARGET is one of ${TARGETS[*]}"
        fresh="$(mktemp -d)"
        mkdir -p "$FUZZ/work/$t" "$FUZZ/corpus/$t"
        "${NICE[@]}" "$(bin_dir)/$t" -merge=1 -max_len="$(max_len "$t")" "$fresh" \
            "$FUZZ/seeds/$t" "$FUZZ/corpus/$t" "$FUZZ/work/$t"
        rm -rf "$FUZZ/corpus/$t"
        mv "$fresh" "$FUZZ/corpus/$t"
        chmod 755 "$FUZZ/corpus/$t"
        echo "fuzz.sh: fuzz/corpus/$t holds $(find "$FUZZ/corpus/$t" -type f | wc -l) inputs"
        ;;
    *)
        sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
        [[ -z $cmd ]] && exit 2
        die "unknown command $cmd"
        ;;
esac
