#!/usr/bin/env bash
# nvcc as the build runs it (setup.py points PYTORCH_NVCC here): it runs the real one, $ATTENTION_EXT_REAL_NVCC,
# and for a Hopper instantiation (csrc/cuda/*sm90_hdim*.cu) also keeps ptxas's report (-Xptxas -v: registers,
# stack, spills, warnings) beside its object, as <object>.ptxas, so that tests/test_hopper_build.py checks the
# code the build made instead of compiling those files a second time. ptxas's warnings still reach the build log.
set -u
real=${ATTENTION_EXT_REAL_NVCC:?"the real nvcc (setup.py sets it)"}
src="" obj="" prev=""
for arg in "$@"; do
  [ "$prev" = "-o" ] && obj=$arg
  case "$arg" in *sm90_hdim*.cu) src=$arg ;; esac
  prev=$arg
done
# shellcheck disable=SC2086  # $real may be a command with arguments (ccache nvcc)
if [ -z "$src" ] || [ -z "$obj" ]; then exec $real "$@"; fi
rm -f "$obj.ptxas"
# shellcheck disable=SC2086
$real "$@" -Xptxas -v >"$obj.ptxas.tmp" 2>&1
rc=$?
grep -v -e "^ptxas info" -e "bytes stack frame" "$obj.ptxas.tmp" >&2
if [ $rc -eq 0 ]; then mv "$obj.ptxas.tmp" "$obj.ptxas"; else rm -f "$obj.ptxas.tmp"; fi
exit $rc
