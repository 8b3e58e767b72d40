#!/bin/bash
# Same five ResNet-20 runs through the CLI on two source trees (e.g. a worktree of an old commit and this one):
# are the codes, bits and accuracy unchanged? Usage: bench/compare_commits.sh OLD_TREE [NEW_TREE]
#   git worktree add /tmp/oldrepo d1dcf1e && bench/compare_commits.sh /tmp/oldrepo
set -u
HERE=$(cd "$(dirname "$0")/.." && pwd)
OLD=$1; NEW=${2:-$HERE}
SHARED=${SHARED:-$HERE/../shared}
W=$SHARED/models/cifar10_resnet20.th
T=cifar10-npz:$SHARED/data/cifar10_test.npz
C=cifar10-npz:$SHARED/data/cifar10_calib1000.npz
PY=$HERE/.venv/bin/python
out=$(mktemp -d)
echo "command: $0 $*  machine: $(nproc) cores, $(uname -m)  date: $(date -u '+%F %H:%M UTC')  out: $out"
run() { # name tree flags...
  name=$1; tree=$2; shift 2
  PYTHONPATH=$tree/src nice "$PY" -m cbdnet compress --arch cifar-resnet20 --weights "$W" "$@" -o "$out/$name.cbd" \
    --json "$out/$name.json" --quiet --force
  PYTHONPATH=$tree/src nice "$PY" -m cbdnet eval "$out/$name.cbd" --data "$T" --json "$out/$name.eval.json" --quiet
}
for pair in "old:$OLD" "new:$NEW"; do
  tag=${pair%%:*}; tree=${pair#*:}
  run "${tag}_paper5" "$tree" --planes 5 --bottleneck 0.3 --fallback size
  run "${tag}_default5" "$tree" --planes 5 --bottleneck 0.3
  run "${tag}_rtn4" "$tree" --method rtn --bits 4
  run "${tag}_tb4" "$tree" --target-bits 4.0 --calib "$C"
  run "${tag}_tb3" "$tree" --target-bits 3.0 --calib "$C"
done
OUT=$out "$PY" - <<'PY'
import json, os
out = os.environ["OUT"]
for s in ["paper5", "default5", "rtn4", "tb4", "tb3"]:
    o, n = (json.load(open(f"{out}/{t}_{s}.json")) for t in ("old", "new"))
    oe, ne = (json.load(open(f"{out}/{t}_{s}.eval.json")) for t in ("old", "new"))
    same = all(a["rel_error"] == b["rel_error"] and a["bits"] == b["bits"] for a, b in zip(o["layers"], n["layers"]))
    print(f"{s}: bpw old {o['bits_per_weight']:.4f} new {n['bits_per_weight']:.4f} | layers identical {same} | "
          f"top1 old {oe['top1']:.4f} new {ne['top1']:.4f} | file bytes old {o['file_bytes']} new {n['file_bytes']}")
PY
