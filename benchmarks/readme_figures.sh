#!/bin/bash
# The README's command-line figures, re-measured as a user types them (results: benchmarks/results/readme_figures-cpu.md).
# Usage: bash benchmarks/readme_figures.sh WORKDIR   (run from the repository root; WORKDIR must not exist yet)
# Each command runs under /usr/bin/time -v (wall, user + system CPU); `uptime` before and after records the load.
set -u
F="${FLOWMAP:-$(pwd)/.venv/bin/flowmap}"
PY="${PYTHON:-$(pwd)/.venv/bin/python}"
export HF_HUB_OFFLINE=1
mkdir "$1" && cd "$1" || exit 2
uptime > load.txt
/usr/bin/time -v "$F" search-depth > search.out 2> search.err
uptime >> load.txt
/usr/bin/time -v "$F" eval builtin:digits-dmf --nfe 1,2,4 -n 2000 --seed 123 --out eval-s123 > eval123.out 2> eval123.err
/usr/bin/time -v "$F" eval builtin:digits-dmf --nfe 1,2,4 -n 2000 --out eval-s0 > eval0.out 2> eval0.err
uptime >> load.txt
/usr/bin/time -v "$F" finetune --mg-scale 0.6 > ft.out 2> ft.err
uptime >> load.txt
# `make demo` after its install step: the same three commands
/usr/bin/time -v "$F" convert builtin:digits-sit --out demo-out/digits-dmf5 > demo1.out 2> demo1.err
/usr/bin/time -v "$F" sample builtin:digits-dmf --nfe 1 --num-samples 100 --out demo-out/samples > demo2.out 2> demo2.err
/usr/bin/time -v "$PY" -m flowmap_convert.demo --out demo-out/compare.png > demo3.out 2> demo3.err
uptime >> load.txt
