#!/usr/bin/env bash
# Gathers, on a machine with the registries (this one), what the offline GPU box lacks into ONE
# git-ignored folder that travels with the tree (the device call's `carry`):
#
#   bash scripts/gather_gpu_bundle.sh            # -> .gpu_bundle/ (a few MiB), prints its size
#
#   .gpu_bundle/wheels/   megatron-core 0.16.x for CPython 3.12 (the box's Python), and packaging
#                         (megatron-core needs >= 24.2; installed there only if its own is older)
#   .gpu_bundle/wheels.txt  one line per wheel: FILE IMPORT_NAME MIN_VERSION ("-": any version);
#                         scripts/gpu_check.sh installs a wheel only where IMPORT_NAME is missing
#                         or older than MIN_VERSION
#   .gpu_bundle/ext/      megatron_pack/_packing for CPython 3.12 (pybind11 is header-only:
#                         its include dir + that Python's headers, libstdc++ linked statically)
#   .gpu_bundle/MANIFEST.txt  what was gathered, from where, sha256
#
# What cannot travel (Transformer Engine's ~180 MB CUDA wheel and its compiled torch extension,
# flash-attn: source only, trl + datasets: not needed) is left out; the check names it as skipped.
# Knobs: GPU_BUNDLE (folder), PY312 (a CPython 3.12 with headers), MCORE_VERSION (0.16.1),
#        MCORE_WHEEL / PACKAGING_WHEEL (use these local files instead of downloading), PACKING_EXT
#        (a prebuilt _packing*.so to copy instead of building; not import-checked).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

find_py312() {  # a CPython 3.12 interpreter: $PY312, python3.12 on PATH, or pyenv's
    local c candidates=(python3.12 /root/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12)
    [ -n "${PY312:-}" ] && candidates=("$PY312")  # named: that one or none
    for c in "${candidates[@]}"; do
        [ -n "$c" ] || continue
        if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null
        then command -v "$c"; return 0; fi
    done
    echo "gather_gpu_bundle: no CPython 3.12 found (set PY312=/path/to/python3.12)" >&2
    return 1
}

download_wheel() {  # download_wheel SPEC DEST: one cp312 manylinux (or pure) wheel, no deps
    local spec=$1 dest=$2
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" -d "$dest" "$spec"
}

build_packing_ext() {  # build_packing_ext PYTHON DEST_DIR: _packing for that Python, into DEST_DIR
    local py=$1 dest=$2 inc suffix pyb
    inc=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
    suffix=$("$py" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
    pyb=$(python3 -c 'import pybind11; print(pybind11.get_include())')  # header-only: any Python's copy
    [ -f "$inc/Python.h" ] || { echo "gather_gpu_bundle: no Python.h under $inc" >&2; return 1; }
    mkdir -p "$dest"
    ${CXX:-g++} -O3 -shared -std=c++17 -fPIC -fvisibility=hidden -static-libstdc++ -static-libgcc \
        -I"$pyb" -I"$inc" "$ROOT/csrc/packing.cpp" -o "$dest/_packing$suffix"
    echo "$dest/_packing$suffix"
}

write_manifest() {  # write_manifest BUNDLE: sizes and sha256 of everything gathered
    local b=$1
    {
        echo "# gathered $(date -u +%Y-%m-%dT%H:%M:%SZ) by scripts/gather_gpu_bundle.sh" \
             "(commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?'))"
        (cd "$b" && find . -type f ! -name MANIFEST.txt | sort | while read -r f; do
            echo "$(sha256sum "$f" | cut -c1-16)  $(du -k "$f" | cut -f1) KiB  ${f#./}"; done)
    } > "$b/MANIFEST.txt"
}

main() {
    local bundle=${GPU_BUNDLE:-$ROOT/.gpu_bundle} py312 mc pk
    rm -rf "$bundle"
    mkdir -p "$bundle/wheels" "$bundle/ext"
    if [ -n "${MCORE_WHEEL:-}" ]; then cp "$MCORE_WHEEL" "$bundle/wheels/"
    else download_wheel "megatron-core==${MCORE_VERSION:-0.16.1}" "$bundle/wheels"; fi
    if [ -n "${PACKAGING_WHEEL:-}" ]; then cp "$PACKAGING_WHEEL" "$bundle/wheels/"
    else download_wheel "packaging==24.2" "$bundle/wheels"; fi
    mc=$(cd "$bundle/wheels" && ls megatron_core-*.whl | head -n1)
    pk=$(cd "$bundle/wheels" && ls packaging-*.whl | head -n1)
    printf '%s megatron.core -\n%s packaging 24.2\n' "$mc" "$pk" > "$bundle/wheels.txt"
    if [ -n "${PACKING_EXT:-}" ]; then cp "$PACKING_EXT" "$bundle/ext/"
    else
        py312=$(find_py312)
        echo "gather_gpu_bundle: Python 3.12 at $py312"
        build_packing_ext "$py312" "$bundle/ext" >/dev/null
        "$py312" -c "import sys; sys.path.insert(0, '$bundle/ext'); import _packing" 2>/dev/null \
            && echo "gather_gpu_bundle: _packing imports under $py312" \
            || { echo "gather_gpu_bundle: the built _packing does not import under $py312" >&2; return 1; }
    fi
    write_manifest "$bundle"
    cat "$bundle/MANIFEST.txt"
    echo "gather_gpu_bundle: $(du -sh "$bundle" | cut -f1) in $bundle (carry it: \"${bundle#"$ROOT"/}\")"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    main "$@"
fi
