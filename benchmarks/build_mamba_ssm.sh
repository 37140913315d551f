#!/usr/bin/env bash
# Build mamba-ssm's Mamba-1 CUDA scan (the extension module selective_scan_cuda), so that
# benchmarks/gpu.py can check and time the 'mamba_ssm' scan backend beside the others.
#
# PyPI has only mamba-ssm's source, and the device machine has no network:
#
#   1. On the dev machine (with PyPI), once:
#        benchmarks/build_mamba_ssm.sh --download
#      which runs
#        pip download --no-deps --no-binary :all: mamba-ssm==2.3.2.post1 -d .whl-src
#      and adds /.whl-src/ to .git/info/exclude (the sdist never gets committed).
#   2. On the device, in a run that carries ".whl-src":
#        benchmarks/build_mamba_ssm.sh
#      starts `pip install --no-build-isolation --no-deps <sdist>` with MAMBA_FORCE_BUILD=TRUE
#      (no attempt to fetch a prebuilt wheel), MAMBA_KEEP_CUDA_BUILD=TRUE (compile the CUDA
#      extension) and MAX_JOBS=16, under setsid in the background, and returns at once. It
#      compiles for several GPU generations and can outlast one 10-minute device command.
#      Log: $MAMBA_BUILD_DIR/build.log (default /tmp/mamba_ssm_build).
#   3. In later runs on the same warm machine:
#        benchmarks/build_mamba_ssm.sh --status
#      prints running / finished (pip's exit status) / not started, the log's tail and whether
#      selective_scan_cuda imports; exit status 0 once it imports, 1 while the build runs, 2 otherwise.
#
# The build keeps all CPU cores busy: CPU-bound timings (the 'reference' and 'torch' scans are
# launch-bound) taken meanwhile are skewed; take the timings you record after it finished.
set -euo pipefail

VERSION=2.3.2.post1
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SRC="$ROOT/.whl-src"
PY=${PYTHON:-python3}
DIR=${MAMBA_BUILD_DIR:-/tmp/mamba_ssm_build}

imports() {
    "$PY" -c 'import torch, selective_scan_cuda' >/dev/null 2>&1
}

running() {
    [[ -f "$DIR/pid" ]] && kill -0 "$(cat "$DIR/pid")" 2>/dev/null && [[ ! -f "$DIR/exit_status" ]]
}

case "${1:-}" in
--download)
    python3 -m pip download --no-deps --no-binary :all: "mamba-ssm==$VERSION" -d "$SRC"
    exclude="$(git -C "$ROOT" rev-parse --git-path info/exclude)"
    [[ "$exclude" = /* ]] || exclude="$ROOT/$exclude"
    grep -qxF '/.whl-src/' "$exclude" 2>/dev/null || echo '/.whl-src/' >>"$exclude"
    ls -l "$SRC"
    echo "carry \".whl-src\" in the device run that calls: benchmarks/build_mamba_ssm.sh"
    ;;
--status)
    if running; then
        echo "mamba-ssm build: running since $(date -r "$DIR/pid" -u +%H:%M:%SZ) (pid $(cat "$DIR/pid"))"
    elif [[ -f "$DIR/exit_status" ]]; then
        echo "mamba-ssm build: finished, pip exit status $(cat "$DIR/exit_status")"
    else
        echo "mamba-ssm build: not started (run benchmarks/build_mamba_ssm.sh on the device)"
    fi
    [[ -f "$DIR/build.log" ]] && tail -n 15 "$DIR/build.log"
    if imports; then
        echo "selective_scan_cuda imports"
        exit 0
    fi
    echo "selective_scan_cuda does not import"
    running && exit 1
    exit 2
    ;;
"")
    if imports; then
        echo "selective_scan_cuda already imports: nothing to build"
        exit 0
    fi
    if running; then
        echo "a build is already running (pid $(cat "$DIR/pid")); poll with --status"
        exit 0
    fi
    sdist=""
    for f in "$SRC/mamba_ssm-$VERSION.tar.gz" "$SRC/mamba-ssm-$VERSION.tar.gz"; do
        [[ -f "$f" ]] && sdist=$f && break
    done
    if [[ -z "$sdist" ]]; then
        echo "no mamba-ssm $VERSION sdist in $SRC: run benchmarks/build_mamba_ssm.sh --download on the dev" \
             "machine, then carry .whl-src" >&2
        exit 2
    fi
    rm -rf "$DIR" && mkdir -p "$DIR"
    MAMBA_KEEP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE MAX_JOBS=16 setsid nohup bash -c \
        'echo $$ >"$2/pid"; "$0" -m pip install --no-build-isolation --no-deps -v "$1" >"$2/build.log" 2>&1
         echo $? >"$2/exit_status"' \
        "$PY" "$sdist" "$DIR" </dev/null >/dev/null 2>&1 &
    echo "mamba-ssm build of ${sdist##*/} started in the background, log $DIR/build.log; poll with --status"
    ;;
*)
    echo "usage: benchmarks/build_mamba_ssm.sh [--download | --status]  (no argument: start the build)" >&2
    exit 2
    ;;
esac
