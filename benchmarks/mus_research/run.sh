#!/bin/bash
# usage: run.sh TAG args...   (runs one training, log in logs/TAG.log)
cd "$(dirname "$0")"
tag=$1; shift
/work/main/.venv/bin/python mus_research.py --tag "$tag" "$@" > logs/$tag.log 2>&1
grep FINAL logs/$tag.log
