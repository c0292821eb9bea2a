/* Single-thread memcpy bandwidth, the physical limit S7 is compared with (benches/PROFILE.md).
 *
 *   cc -O2 -o /tmp/memcpy_bw benches/memcpy/memcpy_bw.c && taskset -c 0 /tmp/memcpy_bw
 *
 * For 64 KiB and 1 MiB blocks:
 *   in cache:  the same block copied back and forth between two buffers (both stay in L2/L3);
 *   out:       blocks taken in turn from a 512 MiB source into a 512 MiB destination, so every
 *              byte comes from and goes to DRAM;
 *   fresh:     each block copied into a buffer just obtained with mmap and unmapped after, as an
 *              allocator that hands large blocks back to the kernel makes every copy do (page
 *              faults and zeroing included).
 * GB/s = 10^9 bytes copied (read once, written once) per second; best of 5 rounds.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static volatile unsigned char sink;

static double in_cache(size_t block, size_t total) {
    unsigned char *a = malloc(block), *b = malloc(block);
    memset(a, 1, block);
    memset(b, 2, block);
    double start = now();
    for (size_t done = 0; done < total; done += 2 * block) {
        memcpy(b, a, block);
        memcpy(a, b, block);
    }
    double t = now() - start;
    sink = a[block / 2] ^ b[block / 3];
    free(a);
    free(b);
    return total / t / 1e9;
}

static double out_of_cache(unsigned char *src, unsigned char *dst, size_t span, size_t block) {
    double start = now();
    for (size_t at = 0; at + block <= span; at += block)
        memcpy(dst + at, src + at, block);
    double t = now() - start;
    sink = dst[span / 2];
    return span / t / 1e9;
}

static double fresh(unsigned char *src, size_t span, size_t block) {
    double start = now();
    for (size_t at = 0; at + block <= span; at += block) {
        unsigned char *d = mmap(NULL, block, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        memcpy(d, src + at, block);
        sink = d[block - 1];
        munmap(d, block);
    }
    double t = now() - start;
    return span / t / 1e9;
}

int main(void) {
    const size_t span = 512u << 20;
    unsigned char *src = malloc(span), *dst = malloc(span);
    memset(src, 3, span);
    memset(dst, 4, span);
    size_t blocks[] = {64u << 10, 1u << 20};
    for (int i = 0; i < 2; i++) {
        size_t block = blocks[i];
        double best[3] = {0, 0, 0};
        for (int round = 0; round < 5; round++) {
            double v[3] = {in_cache(block, 4ull << 30), out_of_cache(src, dst, span, block),
                           fresh(src, span / 4, block)};
            for (int k = 0; k < 3; k++)
                if (v[k] > best[k]) best[k] = v[k];
        }
        printf("%5zu KiB blocks: in cache %.1f GB/s, out of cache %.1f GB/s, into fresh pages %.1f GB/s\n",
               block >> 10, best[0], best[1], best[2]);
    }
    return 0;
}
