#!/bin/sh
# Instructions and heap allocations per accepted message on the broker thread's accept path
# (issue 9), deterministic under valgrind: two runs of examples/accept_cost that sign the same
# envelopes and accept A or B of them; (B - A) / (B - A messages) is the accept path alone.
#   scripts/accept_cost.sh [validate|forward]
# Instructions are counted inside Gateway::on_write only (not the delivery workers).
# Note: valgrind hides SHA-NI, so sha2 runs its portable code here (~3k instructions per
# SHA-256 block); on a CPU with SHA-NI the HMAC and the id digest cost far less.
set -eu
mode=${1:-validate}
A=2000
B=12000
bin=target/release/examples/accept_cost
cargo build -q --release --example accept_cost
tmp=$(mktemp -d)
ir() { valgrind --tool=callgrind --toggle-collect="*Gateway::on_write*" --callgrind-out-file="$tmp/cg.$1" "$bin" "$1" "$mode" 2>&1 |
    sed -n 's/.*Collected : \([0-9]*\).*/\1/p'; }
allocs() { valgrind --tool=memcheck "$bin" "$1" "$mode" 2>&1 |
    sed -n 's/.*total heap usage: \([0-9,]*\) allocs.*/\1/p' | tr -d ,; }
ia=$(ir $A); ib=$(ir $B)
aa=$(allocs $A); ab=$(allocs $B)
sha=$(callgrind_annotate --inclusive=yes "$tmp/cg.$B" 2>/dev/null |
    awk '/sha2::sha256::compress256 \[/ { gsub(",", "", $1); print $1; exit }')
sha_a=$(callgrind_annotate --inclusive=yes "$tmp/cg.$A" 2>/dev/null |
    awk '/sha2::sha256::compress256 \[/ { gsub(",", "", $1); print $1; exit }')
n=$((B - A))
echo "mode=$mode messages=$n"
echo "instructions/message: $(( (ib - ia) / n ))"
echo "  of which sha256 blocks (signing excluded): $(( (${sha:-0} - ${sha_a:-0}) / n ))"
echo "allocations/message: $(echo "scale=2; ($ab - $aa) / $n" | bc)"
echo "callgrind profile of the $B-message run: $tmp/cg.$B"
