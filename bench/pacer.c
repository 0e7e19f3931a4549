/* pacer: the bench's load generator. Produces input events at a fixed rate, open loop, on
 * librdkafka (Debian's librdkafka-dev), so the generator is cheap and its pace does not depend on
 * how fast the broker or the worker answer.
 *
 * Schedule: event i is due at t0 + i / rate (CLOCK_MONOTONIC). The loop sleeps until the due time
 * (absolute clock_nanosleep), then hands the event to librdkafka and moves on: it never waits for
 * an acknowledgement before the next send. A send more than 1 ms after its due time counts as
 * late; the summary says how many and by how much at most. Events go round-robin over S series
 * (key = series id, murmur2 partitioning as the Java client and aiokafka), with the JSON the
 * worker accepts (docs/contract.md "Input events"), the same shape bench/run.py's Python open
 * loop sends:
 *
 *     {"series_id":"sensor-00017","ts":1764300000.123456,"value":53.000}
 *
 * `ts` is the send time (wall clock, microseconds); the record's Kafka timestamp (CreateTime) is
 * the same instant in milliseconds, set explicitly so both come from one clock reading.
 *
 * Producer settings: acks=all with idempotence (a retried batch cannot reorder a series, which
 * the worker would dead-letter as `late`); linger.ms 1 by default. The bench measures latency
 * from the record's CreateTime, set when the event is handed to librdkafka, so every millisecond
 * the record waits in the producer's queue is charged to the worker: librdkafka's default of
 * 5 ms would add up to 5 ms to every figure. 1 ms keeps that under the measurement's own
 * resolution (CreateTime is in milliseconds) while still batching a few records per request at
 * thousands of events/s (0 sends one request per record and costs the broker CPU that the
 * worker shares on a small machine).
 *
 * --deliveries FILE writes one record per acknowledged event, three little-endian int64:
 * partition, offset, CreateTime in ms as the broker stored it. The bench joins forecasts to their
 * input through `source` (partition, offset) with it, without reading the input topic again. An
 * acknowledgement without an offset (-1001) is counted in the summary's `no_offset`: that event
 * cannot be joined.
 *
 * --warmup K sends K points per series instead (unpaced, as fast as the queue takes them), one
 * second apart, the last one 10 s before now, so every series has a window before a paced run.
 *
 * Last line of stdout: a one-line JSON summary. Exit 0 when every event was acknowledged.
 *
 * Build: bash bench/build_pacer.sh (prints the binary's path; cached by the source's hash).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <librdkafka/rdkafka.h>

#define LATE_NS 1000000LL /* a send more than 1 ms behind its due time is late */

static volatile sig_atomic_t stop_requested = 0;
static FILE *deliveries = NULL;
static long long delivered = 0, failed = 0, no_offset = 0;
static char last_error[256] = "";

static void on_signal(int sig) {
    (void)sig;
    stop_requested = 1;
}

static int64_t now_ns(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void sleep_until(int64_t due_ns) {
    struct timespec ts = {.tv_sec = due_ns / 1000000000LL, .tv_nsec = due_ns % 1000000000LL};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR && !stop_requested)
        ;
}

/* Delivery report (served by rd_kafka_poll/flush on this thread). */
static void on_delivery(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque) {
    (void)rk;
    (void)opaque;
    if (m->err) {
        failed++;
        snprintf(last_error, sizeof last_error, "%s", rd_kafka_err2str(m->err));
        return;
    }
    delivered++;
    if (m->offset < 0)
        no_offset++; /* acknowledged, but where it landed is unknown (see main) */
    if (deliveries) {
        rd_kafka_timestamp_type_t tstype;
        int64_t rec[3] = {m->partition, m->offset, rd_kafka_message_timestamp(m, &tstype)};
        fwrite(rec, sizeof rec, 1, deliveries);
    }
}

static void usage(const char *argv0) {
    fprintf(stderr,
            "usage: %s -b BOOTSTRAP -t TOPIC [-r RATE -d SECONDS | --warmup K] [-s SERIES]\n"
            "          [--prefix sensor-] [--deliveries FILE] [--linger-ms 1] [-X key=value]...\n",
            argv0);
}

static int set_conf(rd_kafka_conf_t *conf, const char *key, const char *value) {
    char err[512];
    if (rd_kafka_conf_set(conf, key, value, err, sizeof err) != RD_KAFKA_CONF_OK) {
        fprintf(stderr, "pacer: %s=%s: %s\n", key, value, err);
        return -1;
    }
    return 0;
}

/* Hand one event to librdkafka; on a full queue, serve delivery reports and try again (the wait
 * shows up as lateness of this and the following sends). Returns 0, or -1 on a hard error. */
static int send_event(rd_kafka_t *rk, rd_kafka_topic_t *rkt, const char *key, size_t key_len,
                      char *value, size_t value_len, int64_t create_ms) {
    for (;;) {
        rd_kafka_resp_err_t err = rd_kafka_producev(
            rk, RD_KAFKA_V_RKT(rkt), RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
            RD_KAFKA_V_KEY(key, key_len), RD_KAFKA_V_VALUE(value, value_len),
            RD_KAFKA_V_TIMESTAMP(create_ms), RD_KAFKA_V_END);
        if (!err)
            return 0;
        if (err != RD_KAFKA_RESP_ERR__QUEUE_FULL) {
            fprintf(stderr, "pacer: produce: %s\n", rd_kafka_err2str(err));
            return -1;
        }
        rd_kafka_poll(rk, 1);
    }
}

int main(int argc, char **argv) {
    const char *bootstrap = NULL, *topic = NULL, *prefix = "sensor-", *deliveries_path = NULL;
    const char *linger = "1";
    double rate = 0, duration = 0;
    long series = 1000, warmup = 0;
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    static struct option longopts[] = {
        {"bootstrap", required_argument, 0, 'b'}, {"topic", required_argument, 0, 't'},
        {"rate", required_argument, 0, 'r'},      {"duration", required_argument, 0, 'd'},
        {"series", required_argument, 0, 's'},    {"prefix", required_argument, 0, 'p'},
        {"deliveries", required_argument, 0, 'o'}, {"linger-ms", required_argument, 0, 'l'},
        {"warmup", required_argument, 0, 'w'},    {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0}};
    int c;
    while ((c = getopt_long(argc, argv, "b:t:r:d:s:p:o:l:w:X:h", longopts, NULL)) != -1) {
        switch (c) {
        case 'b': bootstrap = optarg; break;
        case 't': topic = optarg; break;
        case 'r': rate = atof(optarg); break;
        case 'd': duration = atof(optarg); break;
        case 's': series = atol(optarg); break;
        case 'p': prefix = optarg; break;
        case 'o': deliveries_path = optarg; break;
        case 'l': linger = optarg; break;
        case 'w': warmup = atol(optarg); break;
        case 'X': {
            char *eq = strchr(optarg, '=');
            if (!eq) {
                usage(argv[0]);
                return 2;
            }
            *eq = '\0';
            if (set_conf(conf, optarg, eq + 1))
                return 2;
            break;
        }
        default: usage(argv[0]); return c == 'h' ? 0 : 2;
        }
    }
    if (!bootstrap || !topic || series < 1 || (warmup <= 0 && (rate <= 0 || duration <= 0))) {
        usage(argv[0]);
        return 2;
    }

    /* Producer: murmur2 as the Java client (the worker's tests and kcat use the same placement),
     * acks=all through idempotence, a queue deep enough that an open loop never blocks on it. */
    if (set_conf(conf, "bootstrap.servers", bootstrap) || set_conf(conf, "linger.ms", linger) ||
        set_conf(conf, "enable.idempotence", "true") || set_conf(conf, "acks", "all") ||
        set_conf(conf, "partitioner", "murmur2_random") ||
        set_conf(conf, "queue.buffering.max.messages", "2000000") ||
        set_conf(conf, "queue.buffering.max.kbytes", "1048576"))
        return 2;
    rd_kafka_conf_set_dr_msg_cb(conf, on_delivery);
    char err[512];
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, err, sizeof err);
    if (!rk) {
        fprintf(stderr, "pacer: %s\n", err);
        return 2;
    }
    rd_kafka_topic_t *rkt = rd_kafka_topic_new(rk, topic, NULL);
    if (deliveries_path && !(deliveries = fopen(deliveries_path, "wb"))) {
        fprintf(stderr, "pacer: %s: %s\n", deliveries_path, strerror(errno));
        return 2;
    }
    /* Connect and learn the topic's partitions before the schedule starts, so the first sends do
     * not wait in the queue for the connection (that wait would count as their latency); and wait
     * (15 s at most) until every partition's leader answers as the leader. A topic created just
     * before is, for some milliseconds, one whose metadata names a leader that still refuses
     * produce requests (NOT_LEADER_OR_FOLLOWER); if the second batch to such a partition is then
     * accepted, this librdkafka (Debian's 2.0.2, idempotent) takes the refused first one as
     * "implicitly acked" and reports it delivered, with offset -1001, though it is not in the
     * log (seen: debug=eos, IMPLICITACK). A ListOffsets (watermark) query of each partition goes
     * through the same leadership check, so the schedule starts once every one succeeds. */
    int64_t md_deadline = now_ns(CLOCK_MONOTONIC) + 15000000000LL;
    int partitions = 0;
    for (;;) {
        const struct rd_kafka_metadata *md = NULL;
        rd_kafka_resp_err_t merr = rd_kafka_metadata(rk, 0, rkt, &md, 15000);
        if (merr) {
            fprintf(stderr, "pacer: metadata of %s from %s: %s\n", topic, bootstrap,
                    rd_kafka_err2str(merr));
            return 2;
        }
        int ready = md->topic_cnt == 1 && !md->topics[0].err && md->topics[0].partition_cnt > 0;
        for (int p = 0; ready && p < md->topics[0].partition_cnt; p++)
            ready = !md->topics[0].partitions[p].err && md->topics[0].partitions[p].leader >= 0;
        partitions = ready ? md->topics[0].partition_cnt : 0;
        rd_kafka_metadata_destroy(md);
        for (int p = 0; ready && p < partitions; p++) {
            int64_t low, high;
            ready = !rd_kafka_query_watermark_offsets(rk, topic, p, &low, &high, 5000);
        }
        if (ready)
            break;
        if (now_ns(CLOCK_MONOTONIC) > md_deadline) {
            fprintf(stderr, "pacer: %s: a partition without a working leader after 15 s\n", topic);
            return 2;
        }
        sleep_until(now_ns(CLOCK_MONOTONIC) + 100000000LL);
    }
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);

    /* Series ids, built once: prefix + five digits, as bench.harness.series_name. */
    char(*keys)[64] = calloc((size_t)series, 64);
    size_t *key_lens = calloc((size_t)series, sizeof *key_lens);
    if (!keys || !key_lens)
        return 2;
    for (long s = 0; s < series; s++)
        key_lens[s] = (size_t)snprintf(keys[s], 64, "%s%05ld", prefix, s);

    char value[256];
    long long sent = 0, late = 0;
    int64_t max_late = 0, first_send = 0, last_send = 0;
    int rc = 0;
    const char *mode = warmup > 0 ? "warmup" : "paced";

    if (warmup > 0) {
        /* K points per series, time-major, one second apart, ending 10 s before now. */
        double base = (double)now_ns(CLOCK_REALTIME) / 1e9 - (double)warmup - 10.0;
        int64_t create_ms = now_ns(CLOCK_REALTIME) / 1000000;
        first_send = now_ns(CLOCK_MONOTONIC);
        for (long k = 0; k < warmup && !stop_requested && !rc; k++) {
            for (long s = 0; s < series && !rc; s++) {
                int n = snprintf(value, sizeof value, "{\"series_id\":\"%s\",\"ts\":%.6f,"
                                 "\"value\":%.3f}", keys[s], base + (double)k, 50.0 + (double)(k % 7));
                rc = send_event(rk, rkt, keys[s], key_lens[s], value, (size_t)n, create_ms);
                sent += !rc;
                if ((sent & 1023) == 0)
                    rd_kafka_poll(rk, 0);
            }
        }
        last_send = now_ns(CLOCK_MONOTONIC);
    } else {
        long long n_events = (long long)(rate * duration + 0.5);
        double period_ns = 1e9 / rate;
        int64_t t0 = now_ns(CLOCK_MONOTONIC);
        for (long long i = 0; i < n_events && !stop_requested; i++) {
            int64_t due = t0 + (int64_t)((double)i * period_ns);
            int64_t now = now_ns(CLOCK_MONOTONIC);
            if (due - now > 200000) /* time to spare: serve delivery reports first */
                rd_kafka_poll(rk, 0);
            if (due > now_ns(CLOCK_MONOTONIC))
                sleep_until(due);
            now = now_ns(CLOCK_MONOTONIC);
            int64_t behind = now - due;
            if (behind > LATE_NS)
                late++;
            if (behind > max_late)
                max_late = behind;
            int64_t wall_us = now_ns(CLOCK_REALTIME) / 1000;
            long s = (long)(i % series);
            int len = snprintf(value, sizeof value,
                               "{\"series_id\":\"%s\",\"ts\":%" PRId64 ".%06" PRId64
                               ",\"value\":%.3f}",
                               keys[s], wall_us / 1000000, wall_us % 1000000,
                               50.0 + (double)(i % 13));
            if (send_event(rk, rkt, keys[s], key_lens[s], value, (size_t)len, wall_us / 1000)) {
                rc = 1;
                break;
            }
            if (i == 0)
                first_send = now;
            last_send = now;
            sent++;
            if ((sent & 255) == 0)
                rd_kafka_poll(rk, 0);
        }
    }

    /* Wait for every acknowledgement (bounded), then the summary. */
    int64_t flush_start = now_ns(CLOCK_MONOTONIC);
    rd_kafka_resp_err_t ferr = rd_kafka_flush(rk, 60000);
    double flush_s = (double)(now_ns(CLOCK_MONOTONIC) - flush_start) / 1e9;
    if (deliveries)
        fclose(deliveries);
    double span = (double)(last_send - first_send) / 1e9;
    double achieved = sent > 1 && span > 0 ? (double)(sent - 1) / span : 0.0;
    printf("{\"mode\":\"%s\",\"sent\":%lld,\"delivered\":%lld,\"no_offset\":%lld,"
           "\"failed\":%lld,\"unflushed\":%d,"
           "\"late\":%lld,\"late_threshold_ms\":%.0f,\"max_late_ms\":%.3f,\"rate\":%.3f,"
           "\"achieved_rate\":%.3f,\"send_seconds\":%.3f,\"flush_seconds\":%.3f,\"series\":%ld,"
           "\"linger_ms\":%s,\"stopped\":%s,\"error\":\"%s\"}\n",
           mode, sent, delivered, no_offset, failed, rd_kafka_outq_len(rk), late, LATE_NS / 1e6,
           (double)max_late / 1e6, warmup > 0 ? 0.0 : rate, achieved, span, flush_s, series,
           linger, stop_requested ? "true" : "false", last_error);
    fflush(stdout);
    rd_kafka_topic_destroy(rkt);
    rd_kafka_destroy(rk);
    free(keys);
    free(key_lens);
    return rc || ferr || failed || delivered != sent ? 1 : 0;
}
