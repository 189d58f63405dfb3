/*
 * dirtier: guest-side memory dirtier for the compute-agent testbed.
 *
 * Runs as a static binary inside the testbed guest initramfs.  Parameters
 * come from the kernel command line (/proc/cmdline); argv entries of the
 * same form ("dirty_mb=N dirty_rate_mbps=R tick_s=S") override them:
 *
 *   dirty_mb=N         MiB of guest memory to allocate and keep dirtying
 *                      (0 = idle: only print ticks).
 *   dirty_rate_mbps=R  MiB of that buffer re-dirtied per second
 *                      (0 = fill the buffer once with non-zero data, then
 *                      idle; -1 = as fast as the vCPU can go).
 *   tick_s=S           print "TESTBED-GUEST-TICK ..." every S seconds
 *                      (default 5, 0 = never).
 *   dirty_wpp=W        64-bit words written per 4 KiB page and pass
 *                      (1..512, default 512 = the whole page).
 *   dirty_verify=1     before rewriting a word, check that it still holds what
 *                      the previous pass wrote (from pass 3 on: pass 2 follows
 *                      the random fill).  A lost write (a page that arrived
 *                      stale after a migration) prints
 *                      "TESTBED-DIRTIER-MISMATCH ..." (first 20) and is counted
 *                      in the ticks' "bad_pages=".  Default 0: the extra reads
 *                      would change the calibrated dirty rates.
 *
 * The first pass fills every byte with non-zero pseudo-random data.  Each
 * later pass writes pass-dependent, never-zero 64-bit values into W evenly
 * spaced words of every 4 KiB page, so every page is dirtied, never zero (no
 * zero-page shortcut in migration) and changes on every pass.  "dirty rate"
 * means MiB of guest pages dirtied per second.  Writing whole pages (the
 * default) makes the dirtier CPU-bound at high rates, which is what lets
 * QEMU's auto-converge vCPU throttling actually slow it down.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/mman.h>

#define PAGE 4096UL
#define CHUNK (256UL * 1024UL) /* rate control granularity */

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void sleep_s(double s)
{
    if (s <= 0)
        return;
    struct timespec ts;
    ts.tv_sec = (time_t)s;
    ts.tv_nsec = (long)((s - ts.tv_sec) * 1e9);
    nanosleep(&ts, NULL);
}

static long param(const char *text, const char *key, long dflt)
{
    size_t kl = strlen(key);
    const char *p = text;
    while (p && *p) {
        while (*p == ' ' || *p == '\n')
            p++;
        if (strncmp(p, key, kl) == 0 && p[kl] == '=')
            return strtol(p + kl + 1, NULL, 10);
        p = strchr(p, ' ');
    }
    return dflt;
}

int main(int argc, char **argv)
{
    char cmdline[4096] = "";
    FILE *f = fopen("/proc/cmdline", "r");
    if (f) {
        size_t n = fread(cmdline, 1, sizeof(cmdline) - 1, f);
        cmdline[n] = 0;
        fclose(f);
    }
    long mb = param(cmdline, "dirty_mb", 0);
    long rate = param(cmdline, "dirty_rate_mbps", 0);
    long tick = param(cmdline, "tick_s", 5);
    long wpp = param(cmdline, "dirty_wpp", 512);
    long verify = param(cmdline, "dirty_verify", 0);
    for (int i = 1; i < argc; i++) {
        mb = param(argv[i], "dirty_mb", mb);
        rate = param(argv[i], "dirty_rate_mbps", rate);
        tick = param(argv[i], "tick_s", tick);
        wpp = param(argv[i], "dirty_wpp", wpp);
        verify = param(argv[i], "dirty_verify", verify);
    }
    if (wpp < 1)
        wpp = 1;
    if (wpp > 512)
        wpp = 512;
    long step = 512 / wpp;

    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("TESTBED-DIRTIER-START dirty_mb=%ld dirty_rate_mbps=%ld tick_s=%ld dirty_wpp=%ld dirty_verify=%ld\n",
           mb, rate, tick, 512 / step, verify);

    size_t len = (size_t)mb << 20;
    uint64_t *buf = NULL;
    if (len) {
        buf = mmap(NULL, len, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
        if (buf == MAP_FAILED) {
            perror("TESTBED-DIRTIER-ERROR mmap");
            buf = NULL;
            len = 0;
        }
    }
    /* first pass: every byte non-zero */
    uint64_t seed = 0x9E3779B97F4A7C15ULL;
    for (size_t i = 0; i < len / 8; i++) {
        seed ^= seed << 13; seed ^= seed >> 7; seed ^= seed << 17;
        buf[i] = seed | 1;
    }
    if (len)
        printf("TESTBED-DIRTIER-FILLED %ld MiB\n", mb);

    double start = now(), last_tick = start, window_t = start;
    uint64_t pass = 1, window_bytes = 0, total_bytes = 0;
    uint64_t verified_pages = 0, bad_pages = 0;
    size_t off = 0;
    for (;;) {
        if (len && rate != 0) {
            /* dirty one chunk: wpp words per page, value depends on pass */
            size_t end = off + CHUNK > len ? len : off + CHUNK;
            uint64_t v = (pass * 0x9E3779B97F4A7C15ULL) | 1;
            uint64_t prev = ((pass - 1) * 0x9E3779B97F4A7C15ULL) | 1;
            int check = verify && pass >= 3;
            for (size_t p = off; p < end; p += PAGE) {
                uint64_t *pg = (uint64_t *)((char *)buf + p);
                int bad = 0;
                for (long w = 0; w < 512; w += step) {
                    if (check && pg[w] != (prev ^ (p + w)) && !bad++ && bad_pages < 20)
                        printf("TESTBED-DIRTIER-MISMATCH pass=%llu page=%zu word=%ld got=%llx want=%llx\n",
                               (unsigned long long)pass, p / PAGE, w, (unsigned long long)pg[w],
                               (unsigned long long)(prev ^ (p + w)));
                    pg[w] = v ^ (p + w);
                }
                verified_pages += check;
                bad_pages += bad > 0;
            }
            window_bytes += end - off;
            total_bytes += end - off;
            off = end;
            if (off >= len) {
                off = 0;
                pass++;
            }
            if (rate > 0) {
                double due = window_t + (double)window_bytes / ((double)rate * 1048576.0);
                double t = now();
                if (due > t)
                    sleep_s(due - t);
                else if (t - due > 1.0) {
                    /* cannot keep up: do not build up unbounded debt */
                    window_t = t;
                    window_bytes = 0;
                }
            }
        } else {
            sleep_s(tick > 0 ? (double)tick : 1.0);
        }
        double t = now();
        if (tick > 0 && t - last_tick >= tick) {
            double el = t - start;
            printf("TESTBED-GUEST-TICK t=%.0f pass=%llu dirtied_mib=%llu avg_mibps=%.1f"
                   " verified_pages=%llu bad_pages=%llu\n",
                   el, (unsigned long long)pass,
                   (unsigned long long)(total_bytes >> 20),
                   el > 0 ? (total_bytes / 1048576.0) / el : 0.0,
                   (unsigned long long)verified_pages, (unsigned long long)bad_pages);
            last_tick = t;
        }
    }
    return 0;
}
