"""The batch size chosen from memory and cores, and the concurrency a provider advertises."""

from __future__ import annotations

from idlegrid.engines import parallel as par

GEMMA_270M_KV = par.kv_bytes_per_token(18, 1, 256, 256)
GIB = 1 << 30


def test_kv_bytes_per_token_counts_keys_and_values_of_every_layer_in_f16() -> None:
    assert GEMMA_270M_KV == 18 * 512 * 2 == 18432
    assert par.kv_bytes_per_token(32, 8, 128, 128) == 32 * 8 * 256 * 2


def test_default_parallel_is_what_half_the_free_memory_holds_capped_at_eight() -> None:
    per_seq = GEMMA_270M_KV * 8192  # 151 MB a sequence at the default context
    assert par.default_parallel(64 * GIB, GEMMA_270M_KV, 8192) == par.MAX_PARALLEL
    # 5 sequences' caches in free memory: half of it holds 2 of them.
    assert par.default_parallel(5 * per_seq, GEMMA_270M_KV, 8192) == 2
    assert par.default_parallel(7 * per_seq - 1, GEMMA_270M_KV, 8192) == 3
    assert par.default_parallel(6 * per_seq, GEMMA_270M_KV, 8192) == 3
    # A shorter context per sequence fits more of them.
    assert par.default_parallel(5 * per_seq, GEMMA_270M_KV, 2048) == 8


def test_default_parallel_is_off_when_fewer_than_two_sequences_fit() -> None:
    per_seq = GEMMA_270M_KV * 8192
    assert par.default_parallel(3 * per_seq, GEMMA_270M_KV, 8192) == 0
    assert par.default_parallel(0, GEMMA_270M_KV, 8192) == 0


def test_levels_are_powers_of_two_up_to_the_batch_and_the_batch_itself() -> None:
    assert par.levels(8) == [1, 2, 4, 8]
    assert par.levels(6) == [1, 2, 4, 6]
    assert par.levels(2) == [1, 2]
    assert par.levels(1) == [1]
    assert par.levels(0) == []


def test_best_concurrency_is_the_fewest_sequences_within_five_percent_of_the_best() -> None:
    assert par.best_concurrency({1: 39.0, 2: 63.0, 4: 101.0, 8: 115.0}) == 8
    assert par.best_concurrency({1: 39.0, 2: 63.0, 4: 110.0, 8: 115.0}) == 4  # 95.7 %
    assert par.best_concurrency({1: 39.0, 2: 63.0, 4: 109.0, 8: 115.0}) == 8  # 94.8 %
    # Past the machine's knee more sequences only slow each other down.
    assert par.best_concurrency({1: 30.0, 2: 50.0, 4: 45.0, 8: 20.0}) == 2
    assert par.best_concurrency({1: 30.0, 2: 29.0}) == 1
    assert par.best_concurrency({}) == 1


def test_available_memory_reads_a_positive_number_on_this_machine() -> None:
    free = par.available_memory()
    assert free is not None and free > 0
