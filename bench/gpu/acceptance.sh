#!/usr/bin/env bash
# GPU acceptance of keyetron on one H100/H200 with no network, in under 8 minutes from a bare machine:
# installs the carried wheels (.whl/, made by bench/gpu/prepare_wheels.sh) and this working tree
# with --no-deps, then runs bench/gpu/acceptance.py (kernel tests, training steps, attention
# TFLOP/s), which writes acceptance.json and acceptance.md (and acceptance.log) into OUTDIR.
#
#   bench/gpu/acceptance.sh OUTDIR            # on the GPU machine (docs/benchmarks/gpu.md: the device call)
#   bench/gpu/acceptance.sh --smoke OUTDIR    # on a CPU: the same parts with tiny sizes (or ACCEPTANCE_SMOKE=1)
#
# Environment: PYTHON (default python3), ACCEPTANCE_BUDGET_S (whole run, installs included;
# default 450, smoke 3000), ACCEPTANCE_SITE (install target, default /tmp/keyetron-site),
# ACCEPTANCE_WORK (scratch folder), extra arguments for acceptance.py after OUTDIR.
set -uo pipefail
export PYTHONUNBUFFERED=1
start=$(date +%s)
smoke=${ACCEPTANCE_SMOKE:-0}
if [[ "${1:-}" == "--smoke" ]]; then smoke=1; shift; fi
out=${1:?usage: bench/gpu/acceptance.sh [--smoke] OUTDIR [acceptance.py options]}
shift
mkdir -p "$out" && out=$(cd "$out" && pwd)
cd "$(dirname "$0")/../.." || exit 1
py=${PYTHON:-python3}
if [[ $smoke == 1 ]]; then budget=${ACCEPTANCE_BUDGET_S:-3000}; else budget=${ACCEPTANCE_BUDGET_S:-450}; fi
site=${ACCEPTANCE_SITE:-/tmp/keyetron-site}

# -- install: the carried wheels, then this tree (no index, no dependencies, no build isolation:
# nothing can be downloaded there; setuptools comes from the machine's environment) ----------
echo "acceptance: installing into $site with $($py --version 2>&1) ..."
rm -rf "$site"
shopt -s nullglob
wheels=(.whl/*.whl)
install_note=""
if (( ${#wheels[@]} )); then
  if $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${wheels[@]}"; then
    install_note="wheels: $(basename -a "${wheels[@]}" | paste -sd, -)"
  else
    install_note="wheel install FAILED (${wheels[*]})"
  fi
else
  install_note="no .whl/ folder: nothing carried (av, torchao and the tokenizer files must already be installed)"
fi
if $py -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target "$site" . ; then
  install_note+="; keyetron installed"
else
  echo "acceptance: installing keyetron FAILED; nothing else can run" >&2
  install_note+="; keyetron install FAILED"
fi
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
installed=$(( $(date +%s) - start ))
export ACCEPTANCE_INSTALL="$install_note ($installed s)"
echo "acceptance: $ACCEPTANCE_INSTALL"

# -- the run: acceptance.py keeps to what is left of the budget; the hard limit is a backstop ---------
left=$(( budget - installed ))
work=${ACCEPTANCE_WORK:-$(mktemp -d /tmp/keyetron-acceptance-XXXX)}
args=("$out" --budget-s "$left" --work "$work")
[[ $smoke == 1 ]] && args+=(--smoke)
timeout --signal=TERM --kill-after=10 $(( left + 20 )) "$py" bench/gpu/acceptance.py "${args[@]}" "$@"
code=$?
echo "acceptance: finished with exit $code after $(( $(date +%s) - start )) s; reports in $out"
exit $code
