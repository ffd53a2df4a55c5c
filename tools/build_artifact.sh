#!/usr/bin/env bash
# Firmware build step: build the model with `edgetl build`, stop if it misses its budget, and copy the
# artifact and model_data.h into the firmware tree.
#
#   tools/build_artifact.sh PIPELINE.yaml FIRMWARE_DIR [BUILD_OUT]
#
# PIPELINE.yaml must set `export: {c_header: true}`. BUILD_OUT defaults to the build file's `out:`
# (pass it to build somewhere else). The script copies
#   BUILD_OUT/artifact/*            -> FIRMWARE_DIR/model/       (model.onnx, labels.json, preprocess.json, manifest.json, ...)
#   BUILD_OUT/artifact/model_data.h -> FIRMWARE_DIR/include/model_data.h
# model/ is assembled beside its place and swapped in whole, and model_data.h is copied to a temporary
# name and renamed, so the firmware tree never holds half a file or a file of an older artifact.
#
# Exit codes: those of edgetl (1 user error, 3 budget missed: the firmware tree is left untouched).
# EDGETL overrides the command (default: edgetl), e.g. EDGETL="python -m edgetl".
set -euo pipefail

if [[ $# -lt 2 || $# -gt 3 ]]; then
  echo "usage: $0 PIPELINE.yaml FIRMWARE_DIR [BUILD_OUT]" >&2
  exit 2
fi
pipeline=$1
firmware=$2
read -r -a edgetl <<< "${EDGETL:-edgetl}"

args=(build "$pipeline" --json)
if [[ $# -eq 3 ]]; then
  args+=(--out "$3")
fi

status=0
result=$("${edgetl[@]}" "${args[@]}") || status=$?
if [[ $status -eq 3 ]]; then
  echo "edgetl: the model misses its budget; firmware not updated (see the build's report.md)" >&2
  exit 3
elif [[ $status -ne 0 ]]; then
  echo "edgetl build failed (exit code $status); firmware not updated" >&2
  exit "$status"
fi

# the artifact folder, from the build's JSON result
artifact=$(printf '%s' "$result" | python3 -c 'import json, sys; print(json.load(sys.stdin)["artifact"])')
if [[ ! -f "$artifact/model_data.h" ]]; then
  echo "$artifact has no model_data.h; set 'export: {c_header: true}' in $pipeline" >&2
  exit 1
fi

mode=$(printf '%o' $((0666 & ~$(umask))))
install_file() {  # install_file SRC DEST_DIR: copy atomically (temporary name, then rename)
  local tmp
  tmp=$(mktemp "$2/.$(basename "$1").XXXXXX")
  cp "$1" "$tmp"
  chmod "$mode" "$tmp"  # mktemp makes 0600
  mv -f "$tmp" "$2/$(basename "$1")"
}

# model/ is assembled beside its place and swapped in whole: no file of an older artifact survives
mkdir -p "$firmware/include"
stage=$(mktemp -d "$firmware/.model.XXXXXX")
trap 'rm -rf "$stage"' EXIT
chmod "$(printf '%o' $((0777 & ~$(umask))))" "$stage"
for file in "$artifact"/*; do
  if [[ -f "$file" && "$(basename "$file")" != model_data.h ]]; then
    install_file "$file" "$stage"
  fi
done
if [[ -e "$firmware/model" ]]; then
  old="$firmware/.model.old.$$"
  mv "$firmware/model" "$old"
  mv "$stage" "$firmware/model"
  rm -rf "$old"
else
  mv "$stage" "$firmware/model"
fi
install_file "$artifact/model_data.h" "$firmware/include"
echo "copied $artifact into $firmware (model/ and include/model_data.h)"
