#!/usr/bin/env bash
# Analyzer accuracy over seeded games, as recorded in docs/BENCHMARKS.md ("The heist").
#   docs/bench/heist-accuracy.sh [GAMES] [BIN_DIR]
# Starts a local cluster (heistctl dev up), plays GAMES games with seeds 1..GAMES on the scripted
# model, guesses the analyzer's top suspect in each, and prints: top-1 accuracy overall and per
# pattern and severity, the AUROC of the suspicion score (mole vs honest crew), and how often an
# honest member scores above the mole. The seeds and the games come from the game code alone.
set -euo pipefail
games=${1:-200}
bin=${2:-bin}
work=$(mktemp -d)
trap 'kill "$dev" 2>/dev/null; wait "$dev" 2>/dev/null; rm -rf "$work"' EXIT
port=$((20000 + RANDOM % 20000))
"$bin/heistctl" dev up --workers 2 --port "$port" --data-dir "$work/cluster" >"$work/dev.log" 2>&1 &
dev=$!
export HEIST_COORDINATOR="http://127.0.0.1:$port"
ready() { "$bin/heistctl" -o json workers ls 2>/dev/null | python3 -c 'import json,sys; sys.exit(sum(str(w.get("state","")).lower() == "ready" for w in json.load(sys.stdin)) < 2)' 2>/dev/null; }
for _ in $(seq 1 300); do ready && break; sleep 0.2; done
start=$(date +%s.%N)
for seed in $(seq 1 "$games"); do
    "$bin/heistctl" -o json heist run --seed "$seed" --guess >"$work/game.jsonl" \
        || { echo "seed $seed: the game failed" >&2; continue; }
    grep -E '"suspects":|"analyzer_pick":' "$work/game.jsonl" >>"$work/results.jsonl" \
        || { echo "seed $seed: no analysis: $(tail -c 300 "$work/game.jsonl")" >&2; }
done
end=$(date +%s.%N)
python3 - "$work/results.jsonl" "$games" "$start" "$end" <<'PY'
import json, sys, collections
path, games, start, end = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
lines = [json.loads(l) for l in open(path)]
pairs = [(lines[i], lines[i + 1]) for i in range(0, len(lines) - 1, 2)]
top1 = collections.Counter(); total = collections.Counter(); above = 0; honest_n = 0
pos, neg = [], []
for analysis, reveal in pairs:
    mole = reveal["mole"]; key = (reveal["pattern"], reveal["severity"])
    total[key] += 1; top1[key] += reveal["analyzer_pick"] == mole
    scores = {s["agent"]: s["score"] for s in analysis["suspects"]}
    for agent, score in scores.items():
        (pos if agent == mole else neg).append(score)
        if agent != mole:
            honest_n += 1; above += score > scores.get(mole, 0)
wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
auroc = wins / (len(pos) * len(neg)) if pos and neg else float("nan")
n = len(pairs)
print(f"games {n}/{games}, {(end - start) / max(n, 1):.2f} s per game (6 crew x 3 rounds = 18 turns)")
print(f"analyzer top-1 accuracy {sum(top1.values()) / n:.3f} (chance 0.167)")
print(f"AUROC of the suspicion score {auroc:.3f}; honest member scored above the mole {above / honest_n:.3f}")
for key in sorted(total):
    print(f"  {key[0]:<20} severity {key[1]}: {top1[key]}/{total[key]}")
PY
