/* test_shm.c - the routing table in shared memory: readers never see a torn table, and a
 * writer that dies in the middle of a publish leaves the last complete table in force. */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>

#include "shm.h"

/* A segment without session slots: routes and settings are all these tests touch. */
static shm_segment *segment_new(void)
{
    /* As aligned as the real segment (mmap): shm_node_count is cache-line aligned. */
    size_t align = _Alignof(shm_segment);
    size_t size = (sizeof(shm_segment) + align - 1) / align * align;
    shm_segment *shm = aligned_alloc(align, size);
    assert_non_null(shm);
    memset(shm, 0, size);
    return shm;
}

/* A table whose every field says `epoch`: a read mixing two publishes cannot pass table_whole. */
static void table_fill(shm_route_table *t, uint64_t epoch)
{
    memset(t, 0, sizeof(*t));
    t->epoch = epoch;
    t->n_nodes = CONFIG_MAX_NODES;
    t->leader = (int32_t)(epoch % CONFIG_MAX_NODES);
    for (int i = 0; i < CONFIG_MAX_NODES; i++) {
        shm_node *n = &t->nodes[i];
        snprintf(n->name, sizeof(n->name), "n%llu", (unsigned long long)epoch);
        n->port = (int)(epoch & 0xffff);
        n->wal_lsn = epoch;
        n->lag_bytes = (int64_t)epoch;
        n->last_probe_us = (int64_t)epoch;
    }
}

static int table_whole(const shm_route_table *t)
{
    char name[CONFIG_NAME_MAX];
    snprintf(name, sizeof(name), "n%llu", (unsigned long long)t->epoch);
    if (t->n_nodes != CONFIG_MAX_NODES || t->leader != (int32_t)(t->epoch % CONFIG_MAX_NODES))
        return 0;
    for (int i = 0; i < CONFIG_MAX_NODES; i++) {
        const shm_node *n = &t->nodes[i];
        if (strcmp(n->name, name) != 0 || n->port != (int)(t->epoch & 0xffff) ||
            n->wal_lsn != t->epoch || n->lag_bytes != (int64_t)t->epoch ||
            n->last_probe_us != (int64_t)t->epoch)
            return 0;
    }
    return 1;
}

static void test_a_published_table_is_read_back_with_a_new_version(void **state)
{
    (void)state;
    shm_segment *shm = segment_new();
    shm_route_table *in = malloc(sizeof(*in)), *out = malloc(sizeof(*out));
    uint64_t last = shm_routes_version(shm);
    for (uint64_t e = 1; e <= 5; e++) {
        table_fill(in, e);
        shm_routes_publish(shm, in);
        uint64_t v = shm_routes_read(shm, out);
        assert_true(v > last);
        assert_int_equal(v, shm_routes_version(shm));
        assert_int_equal(out->epoch, e);
        assert_true(table_whole(out));
        last = v;
    }
    free(in);
    free(out);
    free(shm);
}

/* What a writer leaves behind when it is killed after it started filling the spare half. */
static void writer_dies_mid_publish(shm_segment *shm)
{
    shm_dbuf *d = &shm->routes.d;
    uint32_t spare = 1 - atomic_load(&d->current);
    atomic_fetch_or(&d->seq[spare], 1u);
    memset((char *)&shm->routes.tab[spare], 0x5a, sizeof(shm->routes.tab[spare]) / 2);
}

static void test_a_writer_killed_mid_publish_leaves_the_last_table_in_force(void **state)
{
    (void)state;
    shm_segment *shm = segment_new();
    shm_route_table *in = malloc(sizeof(*in)), *out = malloc(sizeof(*out));
    table_fill(in, 7);
    shm_routes_publish(shm, in);
    uint64_t before = shm_routes_version(shm);

    writer_dies_mid_publish(shm);
    /* Readers are not stuck and still get epoch 7, whole. */
    assert_int_equal(shm_routes_read(shm, out), before);
    assert_int_equal(out->epoch, 7);
    assert_true(table_whole(out));

    /* The restarted writer publishes over the half its predecessor left odd. */
    table_fill(in, 8);
    shm_routes_publish(shm, in);
    assert_true(shm_routes_read(shm, out) > before);
    assert_int_equal(out->epoch, 8);
    assert_true(table_whole(out));
    table_fill(in, 9);
    shm_routes_publish(shm, in);
    assert_int_equal(shm_routes_read(shm, out) - before, 2);
    assert_int_equal(out->epoch, 9);
    assert_true(table_whole(out));
    free(in);
    free(out);
    free(shm);
}

typedef struct race {
    shm_segment *shm;
    atomic_bool stop;
    atomic_long torn;
    atomic_long reads;
    atomic_long backwards;
    atomic_long overlapped; /* reads during which at least one publish completed */
} race;

#define RACE_MIN_PUBLISHES  20000
#define RACE_MIN_OVERLAPPED 1000 /* below this the test did not exercise the race */
#define RACE_MAX_SECONDS    20

static double race_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void *race_reader(void *arg)
{
    race *r = arg;
    shm_route_table *out = malloc(sizeof(*out));
    uint64_t last_epoch = 0;
    while (!atomic_load(&r->stop)) {
        uint64_t before = shm_routes_version(r->shm);
        shm_routes_read(r->shm, out);
        if (shm_routes_version(r->shm) != before)
            atomic_fetch_add(&r->overlapped, 1);
        if (!table_whole(out))
            atomic_fetch_add(&r->torn, 1);
        if (out->epoch < last_epoch)
            atomic_fetch_add(&r->backwards, 1);
        last_epoch = out->epoch;
        atomic_fetch_add(&r->reads, 1);
    }
    free(out);
    return NULL;
}

static void test_readers_racing_a_writer_never_see_a_torn_or_older_table(void **state)
{
    (void)state;
    race r = {.shm = segment_new()};
    shm_route_table *in = malloc(sizeof(*in));
    table_fill(in, 1);
    shm_routes_publish(r.shm, in);
    pthread_t readers[3];
    for (int i = 0; i < 3; i++)
        assert_int_equal(pthread_create(&readers[i], NULL, race_reader, &r), 0);
    /* Publish until enough reads have overlapped a publish (a read that saw none proves
     * nothing about tearing), within a time limit. */
    double deadline = race_now() + RACE_MAX_SECONDS;
    for (uint64_t e = 2; e < RACE_MIN_PUBLISHES || (atomic_load(&r.overlapped) < RACE_MIN_OVERLAPPED
                                                    && race_now() < deadline); e++) {
        table_fill(in, e);
        shm_routes_publish(r.shm, in);
    }
    /* Let the readers run on past the last publish, then stop them. */
    long reads = atomic_load(&r.reads);
    while (atomic_load(&r.reads) < reads + 3000)
        ;
    atomic_store(&r.stop, true);
    for (int i = 0; i < 3; i++)
        pthread_join(readers[i], NULL);
    printf("    %ld reads, %ld of them overlapped a publish\n", atomic_load(&r.reads),
           atomic_load(&r.overlapped));
    assert_true(atomic_load(&r.overlapped) >= RACE_MIN_OVERLAPPED);
    assert_int_equal(atomic_load(&r.torn), 0);
    assert_int_equal(atomic_load(&r.backwards), 0);
    free(in);
    free(r.shm);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_a_published_table_is_read_back_with_a_new_version),
        cmocka_unit_test(test_a_writer_killed_mid_publish_leaves_the_last_table_in_force),
        cmocka_unit_test(test_readers_racing_a_writer_never_see_a_torn_or_older_table),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
