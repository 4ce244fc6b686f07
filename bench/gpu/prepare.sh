#!/usr/bin/env bash
# Prepare what the GPU machine lacks, on a machine with PyPI access (any OS with python3 + pip, xz).
#
#   bench/gpu/prepare.sh            -> .gpu-carry/site.tar.xz.part-0 .. part-N, .gpu-carry/SHA256SUMS
#
# The GPU machine (Python 3.12, torch 2.11+cu130, numpy 2, transformers 5, ONNX Runtime CPU, no
# network) needs: onnxruntime-gpu (the CUDA provider; its CUDA/cuDNN libraries are torch's), and
# the export side's pins, which its own newer packages break (README, "Why these pins"):
# diffusers 0.32.2, transformers 4.48.x, tokenizers 0.21.x, huggingface_hub < 1.0, plus
# open_clip_torch for the CLIP BPE vocabulary file the random checkpoints are built from. Everything
# else (numpy, Pillow, OpenCV, tqdm, onnx, safetensors, nvidia-ml-py, ...) is already there.
#
# The wheels are installed here into one site folder for CPython 3.12 / manylinux x86_64 (no
# dependencies resolved: each is named), packed with xz (onnxruntime-gpu alone is ~255 MB zipped,
# ~190 MB in xz) and split into pieces that fit one device call each (<= 60 MB; a call carries
# at most 64 MiB with the working tree). bench/gpu/README.md has the device calls.
set -euo pipefail
cd "$(dirname "$0")/../.."

OUT=.gpu-carry
PIECE_BYTES="${PIECE_BYTES:-60000000}"
REQUIREMENTS=(
  "onnxruntime-gpu==1.31.1"
  "diffusers==0.32.2"
  "transformers==4.48.3"
  "tokenizers>=0.21,<0.22"
  "huggingface_hub>=0.24,<1.0"
  "open_clip_torch==3.3.0"
)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$scratch/wheels" "$scratch/site"

# each phase's wall time, printed at the end (the device plan in bench/gpu/README.md quotes them)
timings=()
phase_start=$(date +%s.%N)
phase_done() {
  local now; now=$(date +%s.%N)
  timings+=("$(printf '%-9s %6.1f s' "$1" "$(echo "$now - $phase_start" | bc)")")
  phase_start=$now
}

python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --abi abi3 --abi none "${PLATFORMS[@]}" --platform any -d "$scratch/wheels" "${REQUIREMENTS[@]}"
phase_done download
python3 -m pip install -q --no-deps --no-compile --only-binary=:all: --python-version 3.12 --implementation cp \
  --abi cp312 --abi abi3 --abi none "${PLATFORMS[@]}" --platform any --target "$scratch/site" "$scratch"/wheels/*.whl
# entry-point scripts would name this machine's interpreter; nothing on the GPU machine runs them
rm -rf "$scratch/site/bin"
ls "$scratch/wheels" > "$scratch/site/CARRIED_WHEELS.txt"
phase_done install

rm -rf "$OUT"
mkdir -p "$OUT"
tar -C "$scratch/site" -cf - . | xz -T0 -9 > "$scratch/site.tar.xz"
phase_done pack
split -b "$PIECE_BYTES" -d -a 1 "$scratch/site.tar.xz" "$OUT/site.tar.xz.part-"
(cd "$OUT" && sha256sum site.tar.xz.part-* > SHA256SUMS)
phase_done split

echo "carried wheels:"; sed 's/^/  /' "$scratch/site/CARRIED_WHEELS.txt"
echo "pieces (one device call each, in this order; bench/gpu/README.md):"
ls -l "$OUT" | awk 'NR > 1 {printf "  %s  %s bytes\n", $NF, $5}'
echo "sizes: wheels $(du -sb "$scratch/wheels" | cut -f1) bytes, unpacked site $(du -sb "$scratch/site" | cut -f1) bytes," \
  "packed $(stat -c %s "$scratch/site.tar.xz") bytes"
echo "phases:"; printf '  %s\n' "${timings[@]}"
