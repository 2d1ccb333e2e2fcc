/*
 * memfill: RAM filler/verifier for the vmsnap linuxguest.
 *
 *   memfill SIZE_MB MODE RATE_MB_S      MODE = idle | dirty
 *
 * Allocates SIZE_MB of anonymous memory, fills every 4 KiB page with a pattern
 * derived from (page index, generation), then (dirty mode) keeps rewriting
 * pseudo-randomly chosen pages with generation+1 at about RATE_MB_S.
 *
 * Page layout (512 little-endian 64-bit words), page p, generation g:
 *   word[0]        = MEMFILL_MAGIC                 ("VMSNAPMF")
 *   word[1]        = (p << 32) | g
 *   word[w], w>=2  = splitmix64((p << 41) | (g << 9) | w)
 * so every page is non-zero, incompressible and self-describing: a host can
 * find and check the pages in a RAM image without knowing guest page tables.
 *
 * Serial protocol (stdin/stdout are the serial console; lines end in "\n"):
 *   out: "FILLED <pages>"                       once the fill is done
 *   in : "PING"    -> "PONG"
 *   in : "VERIFY"  -> "VERIFY OK <pages>" | "VERIFY FAIL <first bad page> <bad count>"
 *                     (dirtying is suspended while checking)
 *   in : "CORRUPT <page>" -> "CORRUPTED <page>"  (flips a byte without a new generation;
 *                     a negative test for VERIFY)
 *   in : "STATS"   -> "STATS pages=<n> mode=<m> rewrites=<n> maxgen=<n>"
 *   other          -> "ERR unknown command"
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE_SIZE 4096u
#define WORDS (PAGE_SIZE / 8u)
#define MEMFILL_MAGIC 0x464D50414E534D56ull /* "VMSNAPMF" little-endian */
#define TICK_NS 10000000ll                   /* 10 ms dirty batches */

static uint64_t *mem;
static uint32_t *gen;
static uint64_t npages;
static uint64_t rewrites;

static inline uint64_t splitmix64(uint64_t x)
{
    uint64_t z = x + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static void fill_page(uint64_t p, uint32_t g)
{
    uint64_t *w = mem + p * WORDS;
    uint64_t base = (p << 41) | ((uint64_t)g << 9);
    w[0] = MEMFILL_MAGIC;
    w[1] = (p << 32) | g;
    for (uint64_t i = 2; i < WORDS; i++)
        w[i] = splitmix64(base | i);
}

static int check_page(uint64_t p, uint32_t g)
{
    const uint64_t *w = mem + p * WORDS;
    uint64_t base = (p << 41) | ((uint64_t)g << 9);
    if (w[0] != MEMFILL_MAGIC || w[1] != ((p << 32) | g))
        return 0;
    for (uint64_t i = 2; i < WORDS; i++)
        if (w[i] != splitmix64(base | i))
            return 0;
    return 1;
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000ll + ts.tv_nsec;
}

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
    char buf[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if (n > (int)sizeof buf - 2)
        n = (int)sizeof buf - 2;
    buf[n++] = '\n';
    for (int off = 0; off < n;) {
        ssize_t r = write(1, buf + off, (size_t)(n - off));
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return;
        }
        off += (int)r;
    }
}

static const char *mode_name;

static void handle_line(char *line)
{
    size_t n = strlen(line);
    while (n && (line[n - 1] == '\r' || line[n - 1] == ' ' || line[n - 1] == '\t'))
        line[--n] = 0;
    while (*line == ' ' || *line == '\t' || *line == '\r')
        line++;
    if (!*line)
        return;
    if (!strcmp(line, "PING")) {
        say("PONG");
    } else if (!strcmp(line, "VERIFY")) {
        uint64_t bad = 0, first = 0;
        for (uint64_t p = 0; p < npages; p++)
            if (!check_page(p, gen[p])) {
                if (!bad)
                    first = p;
                bad++;
            }
        if (bad)
            say("VERIFY FAIL %llu %llu", (unsigned long long)first, (unsigned long long)bad);
        else
            say("VERIFY OK %llu", (unsigned long long)npages);
    } else if (!strncmp(line, "CORRUPT ", 8)) {
        uint64_t p = strtoull(line + 8, NULL, 10);
        if (p >= npages) {
            say("ERR page out of range");
            return;
        }
        ((volatile unsigned char *)mem)[p * PAGE_SIZE + 100] ^= 0x5a;
        say("CORRUPTED %llu", (unsigned long long)p);
    } else if (!strcmp(line, "STATS")) {
        uint32_t maxg = 0;
        for (uint64_t p = 0; p < npages; p++)
            if (gen[p] > maxg)
                maxg = gen[p];
        say("STATS pages=%llu mode=%s rewrites=%llu maxgen=%u", (unsigned long long)npages,
            mode_name, (unsigned long long)rewrites, maxg);
    } else {
        say("ERR unknown command");
    }
}

/* Read what is available on stdin and run complete lines. */
static char inbuf[1024];
static size_t inlen;

static void read_input(void)
{
    ssize_t r = read(0, inbuf + inlen, sizeof inbuf - 1 - inlen);
    if (r <= 0)
        return;
    inlen += (size_t)r;
    for (;;) {
        char *nl = NULL;
        for (size_t i = 0; i < inlen; i++)
            if (inbuf[i] == '\n' || inbuf[i] == '\r') {
                nl = inbuf + i;
                break;
            }
        if (!nl)
            break;
        *nl = 0;
        handle_line(inbuf);
        size_t used = (size_t)(nl - inbuf) + 1;
        memmove(inbuf, inbuf + used, inlen - used);
        inlen -= used;
    }
    if (inlen == sizeof inbuf - 1) /* overlong garbage line: drop it */
        inlen = 0;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: memfill SIZE_MB idle|dirty RATE_MB_S\n");
        return 2;
    }
    uint64_t size_mb = strtoull(argv[1], NULL, 10);
    mode_name = argv[2];
    double rate = strtod(argv[3], NULL);
    int dirty = !strcmp(mode_name, "dirty");
    if (!size_mb || (!dirty && strcmp(mode_name, "idle"))) {
        fprintf(stderr, "memfill: bad arguments\n");
        return 2;
    }
    npages = size_mb * (1024 * 1024 / PAGE_SIZE);
    size_t bytes = (size_t)(npages * PAGE_SIZE);
    mem = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE,
               -1, 0);
    gen = calloc(npages, sizeof *gen);
    if (mem == MAP_FAILED || !gen) {
        say("ERR out of memory for %llu MB", (unsigned long long)size_mb);
        return 1;
    }
    for (uint64_t p = 0; p < npages; p++)
        fill_page(p, 0);
    say("FILLED %llu", (unsigned long long)npages);

    double pages_per_ns = dirty && rate > 0 ? rate * (1024.0 * 1024.0 / PAGE_SIZE) / 1e9 : 0;
    uint64_t rng = 0x853C49E6748FEA9Bull ^ (uint64_t)now_ns();
    int64_t last = now_ns();
    double credit = 0; /* pages we may still write */
    for (;;) {
        struct pollfd pfd = {.fd = 0, .events = POLLIN};
        int timeout = pages_per_ns > 0 ? (int)(TICK_NS / 1000000) : -1;
        int pr = poll(&pfd, 1, timeout);
        if (pr > 0 && (pfd.revents & POLLIN)) {
            read_input();
            last = now_ns(); /* no catch-up burst after a long VERIFY */
        } else if (pr > 0 && (pfd.revents & (POLLHUP | POLLERR | POLLNVAL))) {
            usleep(100000); /* console gone: keep running, avoid a busy loop */
        }
        if (pages_per_ns <= 0)
            continue;
        int64_t t = now_ns();
        int64_t dt = t - last;
        last = t;
        /* Cap the debt at two ticks: after a pause/migration (clock jump) or
         * when the CPU cannot keep up we do not burst. */
        if (dt > 2 * TICK_NS)
            dt = 2 * TICK_NS;
        if (dt > 0)
            credit += (double)dt * pages_per_ns;
        while (credit >= 1.0) {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            uint64_t p = rng % npages;
            fill_page(p, gen[p] + 1);
            gen[p]++;
            rewrites++;
            credit -= 1.0;
        }
    }
}
