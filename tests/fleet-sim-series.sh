#!/bin/sh
# Runs fleet-sim at N = 1, 10, 100, 1,000 and 10,000 agents, keeps each
# JSON report in tests/bench/, and redraws tests/bench/fleet-sim.svg and
# the memory table (printed) with tests/plot.py. About 10 minutes on 2
# cores once the release build is done.
set -eu
cd "$(dirname "$0")/.."
out=tests/bench
mkdir -p "$out"
cargo build --locked --release -p modi-controller -p modi-agent -p modi-tests
sim() {
    cargo run --locked --release -p modi-tests --bin fleet-sim -- "$@"
}
for n in 1 10 100 1000; do
    sim --agents "$n" --rounds 5 --idle-secs 5 --json-out "$out/fleet-sim-$n.json" >/dev/null
done
sim --agents 10000 --rounds 3 --subsets 1000 --json-out "$out/fleet-sim-10000.json" >/dev/null
python3 tests/plot.py "$out/fleet-sim.svg" "$out"/fleet-sim-*.json
