#!/usr/bin/env bash
# Builds each seeded mutant of the library (`NANN_MUTANT=NAME` at compile
# time, read by loom builds only: see `sync::mutant`) and
# runs the loom model that must catch it: a mutant that passes its model is a
# model that proves nothing. Prints one line per mutant; exits 1 if any
# mutant survives.
#
#   bash scripts/loom-mutants.sh [NAME ...]
set -uo pipefail
cd "$(dirname "$0")/.."

# mutant -> the model (exact test name in tests/loom.rs) that must fail.
declare -A MODEL=(
  [unlock_relaxed]=l1a_entry_lock_one_writer_one_reader
  [no_writer_fence]=l1a_entry_lock_one_writer_one_reader
  [no_validate_fence]=l1a_entry_lock_one_writer_one_reader
  [writer_ignores_readers]=l1b_entry_lock_one_writer_two_readers
  [writers_share]=l1c_entry_lock_two_writers_one_reader
  [remove_skips_op_lock]=l6_remove_against_update_of_the_same_key
  [retire_frees_at_once]=l2_epoch_publish_and_retire
  [update_key_after_publish]=l3_update_against_search
  [early_promotion]=l4_promotion_against_search
  [reverse_links_first]=l5_insert_against_search
  [seed_not_rescored]=l7_slot_reuse_against_search
  [upsert_checks_unlocked]=l8_upsert_against_upsert_of_the_same_key
)
names=("$@")
[ ${#names[@]} -eq 0 ] && names=(unlock_relaxed no_writer_fence no_validate_fence writer_ignores_readers writers_share
  retire_frees_at_once update_key_after_publish early_promotion reverse_links_first
  remove_skips_op_lock seed_not_rescored upsert_checks_unlocked)

survivors=0
for name in "${names[@]}"; do
  model=${MODEL[$name]:?unknown mutant $name}
  log=$(mktemp)
  # Same flags and target dir as the plain loom run: only nann recompiles.
  NANN_MUTANT="$name" RUSTFLAGS="--cfg loom --cfg crossbeam_loom" CARGO_TARGET_DIR=target/loom \
    cargo test --release --test loom -- --exact "$model" >"$log" 2>&1
  # Caught: an assertion of the model failed (a panic in tests/loom.rs; the
  # process may then abort while dropping loom objects, which is noise).
  if grep -q "panicked at tests/loom.rs" "$log"; then
    why=$(grep -m1 -A1 "panicked at tests/loom.rs" "$log" | tail -1)
    echo "caught   $name by $model: $why"
  elif grep -q "test result: ok" "$log"; then
    echo "SURVIVED $name: $model passed"
    survivors=$((survivors + 1))
  else
    echo "ERROR    $name: build or run failed:"
    tail -20 "$log"
    survivors=$((survivors + 1))
  fi
  rm -f "$log"
done
exit $((survivors > 0))
