/* test_latency.c - per-worker traffic rows of each node in shared memory: latency bucket
 * choice, rows (and worker rows) that share no cache line between workers, sums over workers
 * and the quantiles show latency reports. */
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "shm.h"

/* A real segment (memfd, mmap) for `workers` workers, with node counters "a" and "b". */
static shm_segment *segment_new(int workers)
{
    config cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.workers = workers;
    cfg.max_client_conn = 4;
    int fd = -1;
    shm_segment *shm = shm_create(&cfg, &fd);
    assert_non_null(shm);
    close(fd);
    shm_node_count_ensure(shm, "a");
    shm_node_count_ensure(shm, "b");
    return shm;
}

static void record(shm_segment *shm, uint32_t w, const char *node, uint64_t us)
{
    shm_node_count *c = shm_node_count_get(shm, node);
    assert_non_null(c);
    shm_node_stats *h = shm_node_stats_row(shm, w, shm_node_count_index(shm, c));
    shm_stat_add(&h->buckets[shm_latency_bucket(us)], 1);
    shm_stat_add(&h->latency_us, us);
}

static void test_bucket_is_first_bound_at_or_above(void **state)
{
    (void)state;
    assert_int_equal(shm_latency_bucket(0), 0);
    assert_int_equal(shm_latency_bucket(100), 0);      /* le 100 us */
    assert_int_equal(shm_latency_bucket(101), 1);      /* le 250 us */
    assert_int_equal(shm_latency_bucket(200000), 10);  /* pg_sleep(0.2): le 250 ms */
    assert_int_equal(shm_latency_bucket(60000000), SHM_LATENCY_BOUNDS - 1);
    assert_int_equal(shm_latency_bucket(60000001), SHM_LATENCY_BOUNDS); /* +Inf only */
    assert_int_equal(shm_latency_bounds_us[0], 100);
    assert_int_equal(shm_latency_bounds_us[SHM_LATENCY_BOUNDS - 1], 60000000);
    for (int b = 1; b < SHM_LATENCY_BOUNDS; b++)
        assert_true(shm_latency_bounds_us[b] > shm_latency_bounds_us[b - 1]);
}

static void test_rows_of_two_workers_share_no_cache_line(void **state)
{
    (void)state;
    shm_segment *shm = segment_new(3);
    for (uint32_t w = 0; w < 3; w++)
        for (size_t i = 0; i < SHM_NODE_COUNTS; i++) {
            shm_node_stats *h = shm_node_stats_row(shm, w, i);
            assert_int_equal((uintptr_t)h % 64, 0);
            /* inside the segment */
            assert_true((char *)(h + 1) <= (char *)shm + shm->size);
            /* the last row of worker w ends on or before the line of worker w+1's first */
            if (w + 1 < 3 && i == SHM_NODE_COUNTS - 1)
                assert_true((char *)(h + 1) <= (char *)shm_node_stats_row(shm, w + 1, 0));
        }
    /* after the session slots */
    assert_true((char *)shm_node_stats_row(shm, 0, 0) >= (char *)&shm->sessions[shm->max_sessions]);
}

static void test_worker_rows_are_whole_cache_lines(void **state)
{
    (void)state;
    shm_segment *shm = segment_new(4);
    /* a worker's per-statement counters never share a line with the next worker's */
    assert_int_equal(sizeof(shm_worker) % 64, 0);
    for (int w = 0; w < 4; w++)
        assert_int_equal((uintptr_t)&shm->workers[w] % 64, 0);
    /* what every worker touches per session only: no traffic counter in a node's entry */
    assert_true(sizeof(shm_node_count) <= 128);
}

static void test_node_traffic_of_each_worker_is_summed(void **state)
{
    (void)state;
    shm_segment *shm = segment_new(2);
    shm_node_count *a = shm_node_count_get(shm, "a");
    size_t i = shm_node_count_index(shm, a);
    shm_stat_add(&shm_node_stats_row(shm, 0, i)->statements, 3);
    shm_stat_add(&shm_node_stats_row(shm, 1, i)->statements, 4);
    shm_stat_add(&shm_node_stats_row(shm, 0, i)->bytes_in, 100);
    shm_stat_add(&shm_node_stats_row(shm, 1, i)->bytes_out, 200);
    shm_stat_add(&shm_node_stats_row(shm, 1, i)->errors, 1);
    shm_node_totals t;
    shm_node_totals_read(shm, a, &t);
    assert_int_equal(t.statements, 7);
    assert_int_equal(t.bytes_in, 100);
    assert_int_equal(t.bytes_out, 200);
    assert_int_equal(t.errors, 1);
    shm_node_totals_read(shm, shm_node_count_get(shm, "b"), &t);
    assert_int_equal(t.statements + t.bytes_in + t.bytes_out + t.errors, 0);
}

static void test_read_sums_every_worker_of_one_node(void **state)
{
    (void)state;
    shm_segment *shm = segment_new(2);
    record(shm, 0, "a", 50);
    record(shm, 1, "a", 80);
    record(shm, 1, "a", 3000);
    record(shm, 0, "b", 9000000);
    shm_node_totals sum;
    shm_node_totals_read(shm, shm_node_count_get(shm, "a"), &sum);
    assert_int_equal(sum.count, 3);
    assert_int_equal(sum.latency_us, 3130);
    assert_int_equal(sum.buckets[0], 2);
    assert_int_equal(sum.buckets[shm_latency_bucket(3000)], 1);
    shm_node_totals_read(shm, shm_node_count_get(shm, "b"), &sum);
    assert_int_equal(sum.count, 1);
    assert_int_equal(sum.buckets[shm_latency_bucket(9000000)], 1);
}

static void test_p99_of_95_fast_and_5_slow_is_in_the_slow_bucket(void **state)
{
    (void)state;
    shm_node_totals h;
    memset(&h, 0, sizeof(h));
    h.buckets[shm_latency_bucket(300)] = 95;    /* le 500 us */
    h.buckets[shm_latency_bucket(200000)] = 5;  /* le 250 ms */
    h.count = 100;
    double p50 = shm_latency_quantile_us(&h, 0.50);
    double p95 = shm_latency_quantile_us(&h, 0.95);
    double p99 = shm_latency_quantile_us(&h, 0.99);
    assert_true(p50 > 250 && p50 <= 500);
    assert_true(p95 > 250 && p95 <= 500);
    assert_true(p99 > 100000 && p99 <= 250000);
}

static void test_quantile_of_nothing_and_of_the_slowest_bucket(void **state)
{
    (void)state;
    shm_node_totals h;
    memset(&h, 0, sizeof(h));
    assert_true(shm_latency_quantile_us(&h, 0.99) < 0);
    h.buckets[SHM_LATENCY_BOUNDS] = 1; /* slower than 60 s: no upper bound to interpolate to */
    h.count = 1;
    assert_true(shm_latency_quantile_us(&h, 0.5) == 60000000.0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bucket_is_first_bound_at_or_above),
        cmocka_unit_test(test_rows_of_two_workers_share_no_cache_line),
        cmocka_unit_test(test_worker_rows_are_whole_cache_lines),
        cmocka_unit_test(test_node_traffic_of_each_worker_is_summed),
        cmocka_unit_test(test_read_sums_every_worker_of_one_node),
        cmocka_unit_test(test_p99_of_95_fast_and_5_slow_is_in_the_slow_bucket),
        cmocka_unit_test(test_quantile_of_nothing_and_of_the_slowest_bucket),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
