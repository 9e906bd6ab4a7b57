#!/usr/bin/env bash
# The GPU check, in one command, from the repository root of a machine with a CUDA build of torch and no internet:
#
#   bash tools/gpu_check.sh [WHEELS]       # WHEELS: folder of wheels from tools/fetch_gpu_wheels.sh, default .whl
#
# It installs nbdev, the test tools and the package from the wheels, offline, into a private prefix (packages the
# machine already has, torch above all, are used as they are); then runs side by side `nbdev_test --flags cuda`
# over every notebook and the CUDA pytest tests (`pytest -m cuda`); and prints a short summary. It exits 0 only if
# both pass. Every step has a deadline, so the whole check ends within 6 minutes.
#
# Environment: PYTHON (default python3); GPU_CHECK_DIR (default /tmp/gpu_check) for the prefix and the logs;
# GPU_CHECK_ALLOW_CPU=1 rehearses the install and both runs on a machine without a GPU (without the cuda flag).
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
budget=330                                   # seconds for everything; the runs get what the install leaves
wheels=${1:-.whl}
python=${PYTHON:-python3}
work=${GPU_CHECK_DIR:-/tmp/gpu_check}
logs=$work/logs
now() { echo $(( $(date +%s) - start )); }
fail() { echo "gpu_check: $*" >&2; exit 2; }

has_cuda=$("$python" -c 'import torch; print(int(torch.cuda.is_available()))') || fail "$python has no torch"
flags=cuda
if [ "$has_cuda" != 1 ]; then
    [ "${GPU_CHECK_ALLOW_CPU:-0}" = 1 ] || fail "torch sees no CUDA device (GPU_CHECK_ALLOW_CPU=1 rehearses on the CPU)"
    flags=''                                 # a rehearsal: the cuda cells and tests stay skipped
fi
[ -d "$wheels" ] || fail "no wheel folder $wheels: run tools/fetch_gpu_wheels.sh on a machine with internet and copy it here"

# 1. Install, offline, into the prefix; `--prefix` keeps every package the machine already has. The package is
#    built in pip's isolated build environment, from the setuptools and wheel wheels of the same folder.
rm -rf "$work"; mkdir -p "$logs"
pip=("$python" -m pip install --quiet --disable-pip-version-check --no-cache-dir --no-index --prefix "$work/prefix")
{ timeout 90 "${pip[@]}" --find-links "$wheels" 'nbdev==2.4.14' 'execnb<0.2' 'fastcore<2' 'ghapi<2' matplotlib tqdm pytest hypothesis &&
  timeout 60 "${pip[@]}" --find-links "$wheels" --no-deps . ; } >"$logs/install.log" 2>&1 \
    || { tail -20 "$logs/install.log" >&2; fail "install failed (log: $logs/install.log)"; }
site=$("$python" -c "import sysconfig; print(sysconfig.get_path('purelib', vars={'base': '$work/prefix', 'platbase': '$work/prefix'}))")
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PATH="$work/prefix/bin:$PATH" PYTHONDONTWRITEBYTECODE=1
"$python" -c "import additive_pos_attn, nbdev, execnb, hypothesis, pytest, tqdm" || fail "the installed packages do not import"
install_s=$(now)

# 2. Both runs at once; each is killed at the deadline.
limit=$(( budget - $(now) - 15 ))
run() {  # name, command...: run with the deadline, keep the log, the exit code and the seconds
    local name=$1 t0; shift; t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$logs/$name.log" 2>&1
    echo $? >"$logs/$name.rc"; echo $(( $(date +%s) - t0 )) >"$logs/$name.s"
}
run nbdev_test nbdev_test --flags "$flags" --do_print --timing &
run pytest "$python" -m pytest -m cuda -p no:cacheprovider -q -rfE --durations=5 &
wait

# 3. Summary.
status() { case $1 in 0) echo PASS;; 124|137) echo "TIMEOUT after $limit s";; *) echo "FAIL (exit $1)";; esac; }
nb_rc=$(cat "$logs/nbdev_test.rc"); py_rc=$(cat "$logs/pytest.rc")
nb_count=$(grep -c '^Starting' "$logs/nbdev_test.log")
nb_failed=$(sed -n '/Tests Failed On The Following Notebooks/,$p' "$logs/nbdev_test.log" | grep -P '^\t' | tr -d '\t' | tr '\n' ' ')
py_line=$(grep -E '^=* ?[0-9]+ (passed|failed|skipped|deselected|errors?)\b' "$logs/pytest.log" | tail -1 | tr -d '=' | sed 's/^ *//; s/ *$//')
for name in nbdev_test pytest; do
    if [ "$(cat "$logs/$name.rc")" != 0 ]; then echo "---- end of the $name log ----"; tail -60 "$logs/$name.log"; fi
done
echo "==== GPU check summary ===="
"$python" -c "
import platform, torch
p = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
gpu = f'{p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB' if p else 'no GPU: a rehearsal on the CPU'
print(f'python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}; {gpu}')"
echo "install: ok in ${install_s} s"
echo "nbdev_test --flags '$flags': $(status "$nb_rc"), $nb_count notebooks in $(cat "$logs/nbdev_test.s") s${nb_failed:+; failed: $nb_failed}"
echo "pytest -m cuda: $(status "$py_rc"), ${py_line:-no summary line}, in $(cat "$logs/pytest.s") s"
echo "total: $(now) s; logs in $logs"
[ "$nb_rc" = 0 ] && [ "$py_rc" = 0 ]
